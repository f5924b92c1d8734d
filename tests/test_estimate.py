"""``python -m lm.reproduce --estimate``: the plan's hours projected from timings of the real step."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from lm.config import recipe
from lm.data.corpus import load_corpus
from lm.engine import estimate as estimate_module
from lm.engine import reproduction as reproduction_module
from lm.engine.estimate import (
    PTB_TOKENS,
    STARTUP_SECONDS,
    CorpusSizes,
    average_seconds,
    corpus_sizes,
    estimate_plan,
    format_estimate,
    plan_wall_seconds,
    training_seconds,
)
from lm.engine.reproduction import plan, reproduce, runnable, select
from lm.infra.errors import DataError, UsageError
from lm.reproduce import main

from helpers import tiny_overrides, train_config

TINY = ["model=tiny", "data=custom", "data.batch_size=4", "data.bptt=5", "trainer.device=cpu", "trainer.epochs=1"]
SIZES = CorpusSizes(vocab=50, tokens={"train": 1000, "valid": 100, "test": 120}, source="made up")


def test_a_training_is_its_epochs_validations_and_final_evaluation_at_the_timed_rates(tiny_corpus: Path):
    cfg = train_config(tiny_overrides(tiny_corpus, "trainer.epochs=3"))  # batch 4, bptt 5
    # an epoch predicts 4 x (1000 // 4 - 1) = 996 tokens; valid batched 4 x 24 = 96, test 4 x 29 = 116; streams 99 and 119
    final = (96 + 116) * 1e-4 + (99 + 119) * 2e-4
    assert training_seconds(cfg, SIZES, 1e-3, 1e-4, 2e-4) == pytest.approx(
        3 * 996 * 1e-3 + 3 * 96 * 1e-4 + final + STARTUP_SECONDS
    )
    # trainer.max_steps: 75 of the 50 windows an epoch (996 / 20 tokens, rounded up) are 1.5 epochs and 2 validations
    capped = train_config(tiny_overrides(tiny_corpus, "trainer.epochs=3", "trainer.max_steps=75"))
    assert training_seconds(capped, SIZES, 1e-3, 1e-4, 2e-4) == pytest.approx(
        1.5 * 996 * 1e-3 + 2 * 96 * 1e-4 + final + STARTUP_SECONDS
    )


def test_an_average_of_k_models_costs_k_halves_of_the_two_it_was_timed_with():
    final = (96 + 116) * 1e-4 + (99 + 119) * 2e-4
    assert average_seconds(10, SIZES, 4, 1e-4, 2e-4) == pytest.approx(5 * final + STARTUP_SECONDS)


class Planned:
    def __init__(self, name: str, needs: list[str] = (), done: bool = False):
        self.name, self.needs, self.done, self.work = name, list(needs), done, None


def test_the_wall_time_follows_the_plans_order_its_needs_and_the_jobs():
    steps = [Planned("a"), Planned("b"), Planned("average", ["a", "b"]), Planned("c")]
    seconds = {"a": 3.0, "b": 5.0, "average": 1.0, "c": 4.0}
    assert plan_wall_seconds(steps, seconds, 1) == 13.0
    assert plan_wall_seconds(steps, seconds, 2) == 7.0  # a, b; c after a (3 + 4); the average after b (5 + 1)
    steps[1].done = True
    assert plan_wall_seconds(steps, seconds, 1) == 8.0
    assert plan_wall_seconds([Planned("average", ["outside the selection"])], seconds, 1) == 1.0


def test_the_split_sizes_are_counted_as_lm_data_reads_them(tiny_corpus: Path, tmp_path: Path):
    corpus = load_corpus(tiny_corpus)
    sizes = corpus_sizes(tiny_corpus, False)
    assert sizes.tokens == {s: corpus.split(s).numel() for s in ("train", "valid", "test")} and sizes.vocab == len(corpus.vocab)
    assert corpus_sizes(tmp_path / "no-ptb-here", True).tokens == PTB_TOKENS  # the published counts
    with pytest.raises(DataError, match="no corpus files"):
        corpus_sizes(tmp_path / "no-corpus-here", False)


def test_only_selects_steps_by_name_and_a_run_needs_what_its_steps_need(tmp_path: Path):
    steps = plan(tmp_path, ["small", "gal"], 3, 3, 100, [])
    assert [s.name for s in select(steps, ["train zaremba_small seed 1", "average*"])] == [
        "train zaremba_small seed 1",
        "average 2 zaremba_small models",
    ]
    assert [s.name for s in select(steps, ["*gal_medium*"])] == [
        "train gal_medium seed 1",
        "evaluate gal_medium seed 1 with Monte Carlo dropout",
    ]
    assert select(steps, None) == steps
    with pytest.raises(UsageError, match="--only 'train zaremba_medium \\*' matches no step"):
        select(steps, ["train zaremba_medium *"])
    average = select(steps, ["average*"])
    with pytest.raises(
        UsageError, match="'average 2 zaremba_small models' needs 'train zaremba_small seed 1', which is neither done"
    ):
        runnable(average, steps)
    for step in steps[:2]:  # both members done: the average may run alone
        step.result.parent.mkdir(parents=True)
        step.result.write_text("{}")
    assert [s.name for s in runnable(average, steps)] == [
        "train zaremba_small seed 1",
        "train zaremba_small seed 2",
        "average 2 zaremba_small models",
    ]


def test_the_gru_part_trains_the_small_and_medium_recipes_with_a_gru(tmp_path: Path):
    steps = plan(tmp_path, ["gru"], 10, 3, 100, [])
    assert [s.name for s in steps] == ["train gru_small seed 1", "train gru_medium seed 1"]
    for step, experiment in zip(steps, ("zaremba_small", "zaremba_medium")):
        gru, lstm = train_config(list(step.work.overrides)), train_config([f"experiment={experiment}", "trainer.seed=1"])
        assert gru.model.cell == "gru" and lstm.model.cell == "lstm"
        assert {**recipe(gru), "model.cell": "lstm"} == recipe(lstm)  # the paper's recipe but for the cell


def test_the_placement_part_trains_the_medium_recipe_with_dropout_on_h_and_with_none(tmp_path: Path, capsys):
    steps = plan(tmp_path, ["placement"], 10, 3, 100, ["optim.lr=0.9"])
    assert [s.name for s in steps] == ["train placement recurrent seed 1", "train placement none seed 1"]
    recurrent, none = steps
    assert recurrent.result == tmp_path / "placement" / "recurrent" / "seed-1" / "metrics.json"
    assert f"hydra.run.dir={tmp_path / 'placement' / 'none' / 'seed-1'}" in none.command
    for step, variant in ((recurrent, "recurrent"), (none, "none")):
        assert step.resumable and f"model.dropout_variant={variant}" in step.command and step.command[-1] == "optim.lr=0.9"
        cfg = train_config(list(step.work.overrides))
        assert (cfg.model.dropout_variant, cfg.model.hidden_size, cfg.trainer.epochs, cfg.trainer.seed) == (variant, 650, 39, 1)
        assert cfg.optim.lr == 0.9 and cfg.data.bptt == 35
    assert train_config(list(recurrent.work.overrides)).model.dropout_recurrent == 0.5
    assert train_config(list(recurrent.work.overrides)).model.dropout == 0.5  # Zaremba's places keep theirs
    main(["--root", str(tmp_path / "table1"), "--dry-run"])
    default = capsys.readouterr().out
    assert "train placement" not in default and "train zaremba_large seed 1: to run" in default  # Table 1's rows only
    main(["--root", str(tmp_path / "table1"), "--dry-run", "--parts", "medium", "placement"])
    out = capsys.readouterr().out
    assert "7 steps" in out and "train placement recurrent seed 1: to run" in out and "train placement none seed 1: to run" in out


def table_rows(table: str) -> dict[str, list[str]]:
    """{row: its cells} of the printed table (cells are set apart by two spaces or more)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("row "))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        name, *cells = re.split(r"\s{2,}", line.strip())
        rows[name] = cells
    return rows


class FixedRates:
    """A stopwatch that times nothing: every training at 1 ms a token, evaluations at 0.1 ms (batched) and 0.2 ms (stream)."""

    seconds = 0.0
    busy = ["train zaremba_small (made up)"]
    optional = False

    def time_pending(self):
        pass

    def train(self, cfg, vocab):
        return 1e-3 if cfg.trainer.precision == "fp32" else 5e-4

    def evaluate(self, cfg, vocab, device, rows, window, members=1, mc_samples=0):
        return (1e-4 if rows == cfg.data.batch_size else 2e-4) * max(mc_samples, 1)


def test_the_table_has_a_row_per_kind_of_step_with_its_runs_precision_and_hours(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(estimate_module, "native_bf16", lambda device: None)
    steps = plan(tmp_path, ["small", "gal"], 2, 3, 4, TINY, str(tiny_corpus))
    steps[0].result.parent.mkdir(parents=True)
    steps[0].result.write_text("{}")  # seed 1 is done
    result = estimate_plan(steps, 1, 2, FixedRates())
    sizes = corpus_sizes(tiny_corpus, False)
    small = training_seconds(
        train_config([*TINY, "experiment=zaremba_small", f"data.dir={tiny_corpus}"]), sizes, 1e-3, 1e-4, 2e-4
    )
    rows = {r.name: r for r in result.rows}
    assert list(rows) == [
        "train zaremba_small",
        "average 2 zaremba_small models",
        "train gal_medium",
        "evaluate gal_medium with Monte Carlo dropout",
    ]
    assert rows["train zaremba_small"].seconds == pytest.approx([small, small]) and rows[
        "train zaremba_small"
    ].left == pytest.approx(small)
    mc = rows["evaluate gal_medium with Monte Carlo dropout"].seconds[0]
    batch = 4 * (sizes.tokens["valid"] // 4 - 1) + 4 * (sizes.tokens["test"] // 4 - 1)
    stream = sizes.tokens["valid"] - 1 + sizes.tokens["test"] - 1
    assert mc == pytest.approx((1 + 4) * (batch * 1e-4 + stream * 2e-4) + STARTUP_SECONDS)  # standard, then 4 samples
    table = format_estimate(result)
    cells = table_rows(table)
    assert cells["train zaremba_small"] == ["2", "fp32", f"{small / 3600:.2f}", f"{2 * small / 3600:.2f}", f"{small / 3600:.2f}"]
    assert cells["average 2 zaremba_small models"][:2] == ["1", "fp32"] and cells["train gal_medium"][:2] == ["1", "fp32"]
    total = sum(result.step_seconds.values())
    assert cells["total"] == ["5", f"{total / 3600:.2f}", f"{(total - small) / 3600:.2f}"]
    assert "CPU: " in table and "bf16 instructions: " in table and f"vocabulary {sizes.vocab}" in table
    assert "with --bf16-where-native" not in table
    assert "other processes took more than 10% of the cores of 1 of the timings (train zaremba_small (made up))" in table
    monkeypatch.setattr(estimate_module, "native_bf16", lambda device: "AMX")  # where bf16 is native: what it would save
    faster = estimate_plan(steps, 1, 2, FixedRates())
    assert "bf16 is native here (AMX): with --bf16-where-native the 2 fp32 training(s) left" in format_estimate(faster)
    assert faster.bf16_left_seconds < sum(r.left for r in faster.rows)
    bf16 = estimate_plan(
        plan(tmp_path, ["small"], 2, 3, 4, [*TINY, "trainer.precision=bf16"], str(tiny_corpus)), 1, 2, FixedRates()
    )
    assert [(r.name, r.precision) for r in bf16.rows] == [
        ("train zaremba_small", "bf16"),
        ("average 2 zaremba_small models", "fp32"),
    ]
    assert bf16.bf16_left_seconds is None


@pytest.mark.full  # about 80 s here: each shape's timing runs the real step
def test_the_estimate_times_the_real_step_once_per_shape_and_runs_nothing(tiny_corpus: Path, tmp_path: Path, capsys, monkeypatch):
    for name, value in (("TRAIN_SECONDS", 0.05), ("EVAL_SECONDS", 0.02), ("WARMUP_WINDOWS", 1)):
        monkeypatch.setattr(estimate_module, name, value)
    root = tmp_path / "table1"
    assert reproduce(root, ["small", "gal", "placement"], 1, 2, 1, 3, TINY, str(tiny_corpus), estimate=True) == 0
    out = capsys.readouterr().out
    assert out.count("timed train zaremba_small (hidden 16, 4x5, fp32)") == 1  # the two seeds share one timing
    assert "timed train zaremba_medium (hidden 16, 4x5, fp32, dropout_variant recurrent)" in out
    assert "timed 3 MC dropout samples (hidden 16, 4x5)" in out and "timed 2 models averaged" in out
    assert list(table_rows(out)) == [
        "train zaremba_small",
        "average 2 zaremba_small models",
        "train gal_medium",
        "evaluate gal_medium with Monte Carlo dropout",
        "train placement recurrent",
        "train placement none",
        "total",
    ]
    assert not root.exists()


def test_the_estimate_of_a_selection_and_its_bad_input(tiny_corpus: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(reproduction_module, "Stopwatch", lambda threads, say: FixedRates())
    args = ["--root", str(tmp_path / "table1"), "--data-dir", str(tiny_corpus), *(f"--train-arg={a}" for a in TINY), "--estimate"]
    main([*args, "--parts", "small", "gal", "--only", "train zaremba_small seed 1", "--only", "*Monte Carlo*"])
    out = capsys.readouterr().out
    assert "estimate of 2 steps" in out
    assert list(table_rows(out)) == ["train zaremba_small", "evaluate gal_medium with Monte Carlo dropout", "total"]
    for bad, what in (
        (["--only", "nothing*"], "--only 'nothing*' matches no step"),
        (["--train-arg", "model.hidden_size=-1"], "model.hidden_size must be a positive integer"),
        (["--dry-run"], "not allowed with argument"),
        (["--bf16-where-native", "--train-arg", "trainer.precision=fp32"], "--bf16-where-native and --train-arg"),
    ):
        with pytest.raises(SystemExit) as exit:
            main([*args, *bad])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and what in err, err


def test_warm_up_windows_are_left_out_and_a_slow_first_window_is_the_only_one(monkeypatch):
    monkeypatch.setattr(estimate_module, "WARMUP_WINDOWS", 2)
    assert estimate_module._mean_after_warmup([0.0, 5.0, 6.0, 7.0, 9.0, 10.0], 10.0) == (4 / 3, 3)
    assert estimate_module._mean_after_warmup([0.0, 20.0, 22.0], 10.0) == (2.0, 1)  # the first took the whole budget
    assert not estimate_module._enough([0.0, 1.0, 2.0], 10.0, 40)  # warm-up only
    assert estimate_module._enough([0.0, 1.0, 2.0, 12.5], 10.0, 40) and estimate_module._enough([0.0, 0.1, 0.2, 0.3], 10.0, 1)


def test_only_what_other_processes_take_of_a_timings_cores_counts_as_busy(monkeypatch):
    monkeypatch.setattr(estimate_module.os, "cpu_count", lambda: 2)
    before = (100.0, 10.0)  # busy CPU seconds of the machine, of this process
    assert estimate_module._taken_share(before, (101.5, 11.0), 1.0, 2) == 0.25  # others used half a core of our two
    assert estimate_module._taken_share(before, (101.5, 11.0), 1.0, 1) == 0.0  # the core a 1-thread timing leaves free
    assert estimate_module._taken_share(before, (103.0, 11.0), 1.0, 1) == 1.0
    assert estimate_module._taken_share(None, (103.0, 11.0), 1.0, 1) == 0.0  # no /proc/stat: nothing known


def test_the_timings_share_the_time_given_and_the_optional_ones_come_last(monkeypatch):
    monkeypatch.setattr(estimate_module, "SETUP_SECONDS", 1.0)
    watch = estimate_module.Stopwatch(1, seconds=1.6)
    budgets = []

    def measure(budget):
        budgets.append(budget)
        return 1.0, 1, 10

    watch.optional = True
    assert math.isnan(watch._rate(("b16",), "optional", measure, 3.0))
    watch.optional = False
    for key in ("one", "two"):
        watch._rate((key,), key, measure, 3.0)
    watch.time_pending()  # nothing else takes time: 1.6 s for two shapes of 3 + 1 s, then the optional one
    assert budgets == pytest.approx([3.0 * 1.6 / 8, 3.0 * 1.6 / 4], rel=1e-3)  # the optional one would get 40%: left untimed
    assert watch._rate(("one",), "one", measure, 3.0) == 0.1 and math.isnan(watch._rate(("b16",), "optional", measure, 3.0))
