"""The speed targets of make bench are judged from the measured numbers, with their bounds."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402


def _size(ours, bf16, ref, stream, ref_eval, flop, gemm_only=4000):
    return {
        "train_ratio": ours / ref,
        "train_bf16_ratio": bf16 / ref,
        "reference_train_tokens_per_s": ref,
        "bf16_gemm_only_tokens_per_s": gemm_only,
        "bf16_gemm_gflops_at_step_shapes": 120.0,
        "train_flop_per_token": flop,
        "eval_stream_ratio": stream / ref_eval,
        "reference_eval_fraction_of_fp32_ceiling": ref_eval * flop / 3 / 100e9,
    }


def test_targets_met_and_missed_with_the_ceiling_bounds():
    results = {
        "small": _size(1100, 1700, 1000, 3100, 1000, 15e6),
        "medium": _size(900, 1900, 1000, 2000, 1000, 80e6, gemm_only=2500),
    }
    targets = {t["target"]: t for t in bench.check_targets(results, fp32=100.0, bf16=200.0, bf16_isa="AVX512-BF16")}
    assert targets["small: ours fp32 >= 1.0x reference"]["met"]
    assert not targets["medium: ours fp32 >= 1.0x reference"]["met"]
    assert targets["small: ours bf16 >= 1.6x fp32 reference (AVX512-BF16)"]["met"]
    medium_bf16 = targets["medium: ours bf16 >= 2.0x fp32 reference (AVX512-BF16)"]
    assert not medium_bf16["met"]
    assert "bound 2.50x at the bf16 ceiling" in medium_bf16["why"]  # 200 GFLOP/s / (1000 tok/s * 80 MFLOP)
    assert "own shapes (120 GFLOP/s) would allow 2.50x and fill 76% of our step; the other 24%" in medium_bf16["why"]
    share = targets["medium: products fill >= 65% of the bf16 step"]
    assert share["met"] and share["measured"] == pytest.approx(0.76)
    assert not targets["small: products fill >= 45% of the bf16 step"]["met"]  # 1700 of 4000 tokens/s: 42%


def test_bf16_targets_follow_the_cpus_bf16_instructions():
    results = {"medium": _size(1000, 3100, 1000, 2000, 1000, 80e6, gemm_only=4000)}
    amx = {t["target"] for t in bench.check_targets(results, 100.0, 200.0, bf16_isa="AMX")}
    assert "medium: ours bf16 >= 3.0x fp32 reference (AMX)" in amx
    emulated = {t["target"] for t in bench.check_targets(results, 100.0, 200.0, bf16_isa="none")}
    assert not any("ours bf16" in t for t in emulated)  # no speed target where bf16 is emulated
    assert "medium: products fill >= 65% of the bf16 step" in emulated


def test_sizes_come_from_the_recipes():
    assert bench.recipe_shapes("small") == (200, 20, 0.0, 0.1)
    assert bench.recipe_shapes("medium") == (650, 35, 0.5, 0.05)
    assert bench.recipe_shapes("large") == (1500, 35, 0.65, 0.04)


@pytest.mark.full
def test_profile_charges_every_millisecond_of_a_step(tmp_path):
    """make profile's table: every category of a real (tiny) step, shares that add up to the step."""
    import profile_step

    result = profile_step.profile_recipe("small", "bf16", steps=2)
    assert sum(result["ms"].values()) == pytest.approx(result["step_ms"], rel=1e-6)
    assert result["ms"]["products"] > 0 and 0 < result["products_share"] < 1
    text = profile_step.markdown([result], {"model": "test cpu", "bf16": "none"}, 1)
    assert "test cpu" in text and "| products |" in text and "| Python and dispatch |" in text


def test_step_gemms_count_the_step_flops():
    """The timed products are exactly the dense FLOPs the bench charges per training token."""
    for hidden, bptt in ((200, 20), (650, 35)):
        flop = sum(2 * m * k * n * count for _, m, k, n, count in bench.step_gemms(hidden, bptt))
        assert flop == bench.train_flops_per_token(hidden) * bench.BATCH * bptt


def test_gemm_seconds_charges_each_product_its_count_and_rate(monkeypatch):
    """Each shape is timed over at most 8 products and charged for all of its ``count``; the rate is
    the step's FLOPs over that time (a fixed 4 ms per timed call stands in for the clock)."""
    calls = []
    monkeypatch.setattr(bench, "_timed", lambda fn, device=bench.CPU: calls.append(fn()) or 0.004)
    timing = bench.gemm_seconds(16, 3, bench.torch.float32, reps=3)
    gemms = bench.step_gemms(16, 3)
    seconds = sum(count * 0.004 / min(count, 8) for _, _, _, _, count in gemms)
    flop = sum(2 * m * k * n * count for _, m, k, n, count in gemms)
    assert len(calls) == 3 * len(gemms)
    assert [len(c) for c in calls[:3]] == [min(gemms[0][4], 8)] * 3  # the products of one timed call
    assert timing["seconds"] == pytest.approx(seconds)
    assert timing["gflops"] == pytest.approx(flop / seconds / 1e9)


def test_timers_take_turns_and_ratios_pair_them():
    """A machine that slows down during the run must not tilt a ratio: each repetition times every step in turn."""
    calls, clock = [], iter(range(1, 100))

    def timer(name, cost):
        def run():
            calls.append(name)
            return cost * next(clock)  # every call slower than the last

        return run

    rates = bench.interleaved_rates({"ours": timer("ours", 1.0), "ref": timer("ref", 1.0)}, tokens=100, reps=3)
    assert calls == ["ours", "ref"] * 4  # one warm-up round, then three side by side
    assert all(a > b for a, b in zip(rates["ours"], rates["ref"]))  # ours ran first in each round
    assert bench.paired_ratio([4.0, 2.0, 1.0], [2.0, 1.0, 0.5]) == 2.0


def test_cuda_bench_without_a_gpu_is_refused(capsys):
    """--device cuda on a machine torch sees no GPU on: one line and exit code 2, nothing written."""
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--device", "cuda", "--quick", "--out", "/nonexistent/never-written.json"])
    assert stop.value.code == 2
    assert "--device cuda: torch sees no GPU here" in capsys.readouterr().err


@pytest.mark.full
def test_emulated_bf16_is_not_timed_and_has_no_targets(tmp_path, monkeypatch, capsys):
    """Where the CPU has no bf16 instructions the bench skips the bf16 step (tens of times slower than
    fp32 there) and judges only the fp32 targets."""
    monkeypatch.setattr(bench.kernels, "cpu_info", lambda: {"model": "test cpu", "bf16": "none"})
    monkeypatch.setattr(bench, "matmul_gflops", lambda dtype, device: 100.0 if dtype == bench.torch.float32 else 2.0)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--sizes", "small", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "bf16 is emulated on this CPU (50x below fp32 at the matmul ceiling)" in printed
    report = json.loads(out.read_text())
    small = report["sizes"]["small"]
    assert report["bf16_timed"] is False and small["train_bf16_tokens_per_s"] is None
    assert set(small["repetitions"]["train"]) == {"fp32", "reference"}
    assert [t["target"] for t in report["targets"]] == ["small: ours fp32 >= 1.0x reference"]


@pytest.mark.full
def test_profile_skips_emulated_bf16_unless_asked(tmp_path, monkeypatch, capsys):
    import profile_step

    monkeypatch.setattr(profile_step.kernels, "cpu_info", lambda: {"model": "test cpu", "bf16": "none"})
    profile_step.main(["--sizes", "small", "--steps", "2", "--out", str(tmp_path)])
    assert "profiling fp32 only" in capsys.readouterr().out
    report = json.loads((tmp_path / "profile.json").read_text())
    assert [r["precision"] for r in report["results"]] == ["fp32"]
    assert "| small fp32 |" in (tmp_path / "README.md").read_text()


def test_matmul_ceiling_stops_early_where_products_are_slow(monkeypatch):
    """A slow product (emulated bf16) ends the ceiling's measurement after a few seconds: one size,
    not ten products of each; a fast one gets every repetition of both sizes."""
    calls = []
    for took, expected_calls in ((1.0, 3), (0.001, 22)):
        calls.clear()
        monkeypatch.setattr(bench, "_timed", lambda fn, device=bench.CPU, took=took: calls.append(took) or took)
        rate = bench.matmul_gflops(bench.torch.float32, reps=10, seconds=2.0)
        assert len(calls) == expected_calls
        assert rate == pytest.approx(2 * (1024 if took == 1.0 else 2048) ** 3 / took / 1e9)


def test_the_json_is_written_after_every_size_and_a_deadline_starts_nothing_new(tmp_path, monkeypatch):
    """make gpu-check stops the bench at its budget: what was measured by then must already be on disk."""
    monkeypatch.setattr(bench.kernels, "cpu_info", lambda: {"model": "test cpu", "bf16": "none"})
    monkeypatch.setattr(bench, "matmul_gflops", lambda dtype, device: 100.0)
    fake = {
        "train_tokens_per_s": 10.0,
        "train_flop_per_token": 1e6,
        "train_bf16_tokens_per_s": None,
        "train_bf16_ratio": None,
        "train_ratio": 1.1,
        "reference_eval_batched_tokens_per_s": 5.0,
        "eval_flop_per_token": 1e5,
        "host_syncs": None,
    }
    out = tmp_path / "bench.json"

    def small_then_stopped(name, *args, **kwargs):
        if name == "medium":
            assert json.loads(out.read_text())["sizes"]["small"]["train_ratio"] == 1.1  # written before the next size
            raise KeyboardInterrupt  # the caller's time limit
        return dict(fake)

    monkeypatch.setattr(bench, "bench_size", small_then_stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--sizes", "small", "medium", "--out", str(out)])
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and list(partial["sizes"]) == ["small"]
    assert [t["target"] for t in partial["targets"]] == ["small: ours fp32 >= 1.0x reference"]

    bench.main(["--quick", "--sizes", "small", "medium", "--variants", "--deadline", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["skipped"] == ["small", "medium", "variants", "cells"] and report["complete"] is False and report["sizes"] == {}
