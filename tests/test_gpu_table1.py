"""make gpu-table1: the plan against lm.reproduce's, the time budget, MPS's probe and fallback, the
import of what comes back, and the whole plan run dry on CPU twice (the second run continues)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_table1  # noqa: E402


def test_the_plan_names_the_steps_and_folders_lm_reproduce_runs(tmp_path):
    """The summary reads each step's files where lm.reproduce puts them: the two must not drift apart."""
    from lm.engine.reproduction import plan

    for part in gpu_table1.PARTS:
        steps = plan(tmp_path / part.name, [part.name], small_models=10, medium_models=3, mc_samples=100, extra=[])
        expected = [(s.name, s.result.relative_to(tmp_path / part.name)) for s in steps]
        ours = [(name, Path(folder) / gpu_table1.RESULT_OF[kind]) for name, folder, kind in part.steps]
        assert ours == expected


def test_the_command_fits_its_minutes_and_trains_on_the_gpu(tmp_path):
    args = gpu_table1.parse_args(["--train-arg", "trainer.tf32=true"])
    assert args.minutes == 9.5 and args.mc_samples == 100
    assert args.minutes * 60 - gpu_table1.STOP_MARGIN > 8 * 60  # the plans' SIGTERM, then the grace and the archive
    medium = next(p for p in gpu_table1.PARTS if p.name == "medium")
    command = gpu_table1.part_command("python", medium, tmp_path, args, None)
    assert command[command.index("--root") + 1] == str(tmp_path / "medium") and command[command.index("--jobs") + 1] == "3"
    train_args = [command[i + 1] for i, word in enumerate(command) if word == "--train-arg"]
    assert train_args == ["trainer.device=cuda", "data.download=false", "trainer.tf32=true"]
    assert sum(p.jobs for p in gpu_table1.PARTS) == 5  # large, Gal's medium and three medium seeds at once


def test_without_mps_the_plans_run_one_after_another_medium_first():
    """Without MPS the GPU takes turns between processes: five trainings at once would each reach the mark
    a fifth done. One plan at a time instead, each training after the other, the averages' members first."""
    parts = list(gpu_table1.PARTS)
    assert gpu_table1.waves(parts, "auto", mps_used=True) == [parts]
    assert gpu_table1.waves(parts, "all", mps_used=False) == [parts]
    sequential = gpu_table1.waves(parts, "auto", mps_used=False)
    assert [[(p.name, p.jobs) for p in wave] for wave in sequential] == [[("medium", 1)], [("gal", 1)], [("large", 1)]]
    assert gpu_table1.waves(parts, "sequential", mps_used=True) == sequential


def test_mps_falls_back_when_its_probe_fails(tmp_path, monkeypatch):
    """A GPU machine where MPS starts but its clients cannot run (a virtualised GPU, say): the daemon is
    told to quit, the trainings share the GPU without it, and the summary says why."""
    calls = tmp_path / "calls"
    control = tmp_path / "bin" / "nvidia-cuda-mps-control"
    control.parent.mkdir()
    control.write_text(f'#!/bin/sh\necho "$@" "$(cat 2>/dev/null)" >> {calls}\n')
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{control.parent}{os.pathsep}{os.environ['PATH']}")
    env = {"PATH": os.environ["PATH"]}
    failing_python = str(tmp_path / "bin" / "no-python-here")
    phase = gpu_table1.start_mps("auto", tmp_path / "mps", failing_python, env, dry_run=False)
    assert phase.ok and phase.detail["used"] is False and "CUDA_MPS_PIPE_DIRECTORY" not in env
    # a daemon left by an interrupted run told to quit, this one started, then told to quit
    assert [line.strip() for line in calls.read_text().splitlines()] == ["quit", "-d", "quit"]
    assert not gpu_table1.start_mps("on", tmp_path / "mps", failing_python, dict(env), dry_run=False).ok
    assert gpu_table1.start_mps("off", tmp_path / "mps", failing_python, env, dry_run=False).skipped == "--mps off"


def test_a_failed_step_keeps_the_tail_of_its_log_in_the_summary(tmp_path):
    gal = next(p for p in gpu_table1.PARTS if p.name == "gal")
    run = tmp_path / "gal" / "gal_medium" / "seed-1"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "train.log").write_text("12:00:20 epoch  1  lr 1  train ppl   612.29  valid ppl   281.02   52341 words/s     18s\n")
    logs = tmp_path / "gal" / "logs"
    logs.mkdir()
    (logs / "train_gal_medium_seed_1.log").write_text("line\n" * 20 + "torch.OutOfMemoryError: CUDA out of memory\n")
    console = "start: train gal_medium seed 1 (3 threads)\nfailed: train gal_medium seed 1 (exit 1); its log: x\n"
    record = gpu_table1.step_record(tmp_path, gal, gal.steps[0], "not started", console)
    assert record["after"] == "failed" and record["log_tail"][-1] == "torch.OutOfMemoryError: CUDA out of memory"
    assert (record["epochs_done"], record["words_per_s_median"]) == (1, 52341.0)
    assert gpu_table1.step_state(run, "train") == "partial" and gpu_table1.step_state(run, "mc") == "not started"


def test_the_import_takes_only_result_files_and_never_writes_outside(tmp_path):
    archive = tmp_path / "out" / gpu_table1.ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("medium/zaremba_medium/seed-1/metrics.json", "../outside/metrics.json", "/abs/metrics.json",
                     "medium/zaremba_medium/seed-1/checkpoint.pt", "medium/logs/train_x.log", "medium/notes.sh"):  # fmt: skip
            data = b"{}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (archive.parent / "summary.json").write_text("{}")
    into = tmp_path / "results" / "gpu-table1"
    imported = gpu_table1.import_results(archive.parent, into)
    assert imported == ["medium/zaremba_medium/seed-1/metrics.json", "medium/logs/train_x.log"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and "out" not in p.parts) == [
        "results/gpu-table1/medium/logs/train_x.log",
        "results/gpu-table1/medium/zaremba_medium/seed-1/metrics.json",
        "results/gpu-table1/summary.json",
    ]


@pytest.mark.full
def test_the_whole_plan_runs_dry_on_cpu_comes_back_small_and_a_rerun_continues(tmp_path):
    """Every phase and step of make gpu-table1 on the CPU (the tiny model, the graph bookkeeping emulated);
    what comes back holds no checkpoint and makes the table's rows; the same command again runs nothing twice."""
    from lm.reporting.publish import write_report

    out, root = tmp_path / "out", tmp_path / "runs"
    command = [sys.executable, "scripts/gpu_table1.py", "--dry-run", "--out", str(out), "--root", str(root), "--minutes", "8"]
    command += ["--concurrency", "all"]  # as on a GPU with MPS (one plan after another: test_without_mps_the_plans_...)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    assert [p["name"] for p in summary["phases"]] == [
        "install",
        "mps",
        "self-check",
        "plan large",
        "plan gal",
        "plan medium",
        "collect",
    ]
    check = summary["phases"][2]["detail"]
    assert check["ok"] and check["graphs"]["replayed_steps"] > 0 and check["max_parameter_difference"] < 1e-5
    steps = {s["step"]: s for s in summary["steps"]}
    assert len(steps) == 8 and all((s["before"], s["after"]) == ("not started", "done") for s in steps.values())
    large = steps["train zaremba_large seed 1"]
    assert large["step_paths"]["cuda_graphs"]["replayed_steps"] == 2  # 3 warm-up steps, then the replays (emulated)
    assert steps["evaluate gal_medium seed 1 with Monte Carlo dropout"]["mc_samples"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["gpu-table1.tar.gz", "gpu_table1.log", "summary.json"]
    with tarfile.open(out / gpu_table1.ARCHIVE) as tar:
        names = tar.getnames()
    assert "medium/zaremba_medium/average-3/ensemble.json" in names and "gal/gal_medium/seed-1/eval.json" in names
    assert not [n for n in names if n.endswith(".pt") or "/tb/" in n]
    assert (root / "large" / "zaremba_large" / "seed-1" / "checkpoint.pt").is_file()  # stays on the device

    gpu_table1.import_results(out, tmp_path / "results" / "gpu-table1")
    table = write_report(tmp_path / "results", plots=False)
    assert "| `gpu-table1/medium/zaremba_medium/average-3` (zaremba_medium) | 3 |" in table
    assert "| `gpu-table1/gal/gal_medium/seed-1` |  | 2 |" in table  # the Monte Carlo row

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=480)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rerun = json.loads((out / "summary.json").read_text())
    assert all((s["before"], s["after"]) == ("done", "done") and "minutes_this_run" not in s for s in rerun["steps"])
