"""``python -m lm.reproduce``: Table 1's steps planned, run in order, continued after a stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm.engine import reproduction as reproduce_module
from lm.engine.reproduction import Step, core_sets, execute, plan, reproduce, status
from lm.reproduce import REPORT

from helpers import REPO

TINY = ["model=tiny", "data=custom", "data.batch_size=4", "data.bptt=5", "trainer.device=cpu", "trainer.epochs=1"]


def test_the_plan_holds_every_row_and_caps_the_averages_at_the_models_trained(tmp_path: Path):
    steps = plan(tmp_path, ["small", "medium", "large", "gal"], 10, 3, 100, [])
    names = [s.name for s in steps]
    assert sum(n.startswith("train zaremba_small") for n in names) == 10
    assert [n for n in names if n.startswith("average")] == [
        "average 2 zaremba_small models",
        "average 5 zaremba_small models",
        "average 10 zaremba_small models",
        "average 2 zaremba_medium models",
        "average 3 zaremba_medium models",
    ]
    assert "train zaremba_large seed 1" in names and "evaluate gal_medium seed 1 with Monte Carlo dropout" in names
    few = [s.name for s in plan(tmp_path, ["small"], 3, 3, 100, [])]
    assert [n for n in few if n.startswith("average")] == ["average 2 zaremba_small models"]  # 5 and 10 need more models
    mc = next(s for s in steps if s.name.startswith("evaluate"))
    assert "eval.mc_samples=100" in mc.command and mc.needs == ["train gal_medium seed 1"]


def test_a_step_is_done_by_its_result_and_a_training_continues_from_its_checkpoint(tmp_path: Path):
    steps = {s.name: s for s in plan(tmp_path, ["small"], 2, 3, 100, [])}
    first, second, average = (
        steps["train zaremba_small seed 1"],
        steps["train zaremba_small seed 2"],
        steps["average 2 zaremba_small models"],
    )
    assert status(first, steps) == "to run" and status(average, steps) == "waits for 2 of the 2 run(s) it needs"
    first.result.parent.mkdir(parents=True)
    first.result.write_text("{}")
    second.result.parent.mkdir(parents=True)
    (second.result.parent / "checkpoint.pt").write_bytes(b"")
    assert status(first, steps) == "done" and status(second, steps) == "continues from its checkpoint"
    assert status(average, steps) == "waits for 1 of the 2 run(s) it needs"


@pytest.mark.slow
def test_small_averages_and_the_variational_mc_evaluation_run_to_the_table(tiny_corpus: Path, tmp_path: Path, capsys):
    root = tmp_path / "table1"
    code = reproduce(root, ["small", "gal"], 2, 2, 1, 2, TINY, str(tiny_corpus), report=REPORT)
    out = capsys.readouterr().out
    assert code == 0, out
    for folder in ("zaremba_small/seed-1", "zaremba_small/seed-2", "gal_medium/seed-1"):
        assert (root / folder / "metrics.json").is_file()
    average = json.loads((root / "zaremba_small" / "average-2" / "ensemble.json").read_text())
    assert average["n_models"] == 2 and average["members"] == []  # the members' own numbers are in their metrics.json
    evaluation = json.loads((root / "gal_medium" / "seed-1" / "eval.json").read_text())
    assert evaluation["mc_dropout"]["samples"] == 2
    assert "## Model averaging" in out and "## Monte Carlo dropout" in out
    started = out.count("start: ")
    assert reproduce(root, ["small", "gal"], 2, 2, 1, 2, TINY, str(tiny_corpus)) == 0  # all done: nothing runs again
    assert capsys.readouterr().out.count("start: ") == 0 and started == 5


@pytest.mark.full
def test_a_failed_step_stops_the_plan_with_its_log_named(tiny_corpus: Path, tmp_path: Path, capsys):
    root = tmp_path / "table1"
    assert reproduce(root, ["small"], 1, 2, 1, 2, [*TINY, "optim.lr=-1"], str(tiny_corpus)) == 1
    captured = capsys.readouterr()
    assert "failed: train zaremba_small seed 1 (exit 2)" in captured.out
    assert "start: train zaremba_small seed 2" not in captured.out  # nothing new after a failure
    assert "optim.lr" in (root / "logs" / "train_zaremba_small_seed_1.log").read_text()
    assert "not done: train zaremba_small seed 1, train zaremba_small seed 2, average 2 zaremba_small models" in captured.err


def test_jobs_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr(reproduce_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5}, raising=False)
    assert core_sets(2, 2) == [(0, 1), (2, 3)] and core_sets(5, 1) == [(0,), (1,), (2,), (3,), (5,)]
    assert core_sets(3, 2) == [] and core_sets(1, 4) == []  # too few cores; one job is not pinned


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores and Linux")
@pytest.mark.full
def test_each_running_step_is_pinned_to_its_own_core(tmp_path: Path, capsys):
    """Three steps, two at a time, one thread each: the two that run together never share a core,
    and the third takes the core its predecessor freed."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    report = (
        "import json, os, sys, time; time.sleep(0.5); open(sys.argv[1], 'w').write(json.dumps(sorted(os.sched_getaffinity(0))))"
    )
    steps = [
        Step(f"step {k}", [sys.executable, "-c", report, str(tmp_path / f"{k}.json")], tmp_path / f"{k}.json", "threads={}")
        for k in range(3)
    ]
    assert execute(steps, 2, 1, tmp_path / "logs") == []
    seen = [json.loads((tmp_path / f"{k}.json").read_text()) for k in range(3)]
    assert sorted(seen[0] + seen[1]) == cores and seen[2] in ([cores[0]], [cores[1]])
    assert "start: step 0 (1 thread, core " in capsys.readouterr().out


@pytest.mark.full
def test_train_arg_may_not_set_what_each_step_sets():
    result = subprocess.run(
        [sys.executable, "-m", "lm.reproduce", "--dry-run", "--train-arg", "trainer.seed=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "trainer.seed" in result.stderr


@pytest.mark.slow
def test_sigterm_checkpoints_the_running_steps_and_the_same_command_continues(tiny_corpus: Path, tmp_path: Path):
    root = tmp_path / "table1"
    args = [
        sys.executable,
        "-m",
        "lm.reproduce",
        "--root",
        str(root),
        "--parts",
        "small",
        "--small-models",
        "2",
        "--jobs",
        "2",
        "--data-dir",
        str(tiny_corpus),
        *(f"--train-arg={a}" for a in [*TINY, "trainer.epochs=200"]),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "LM_FAULT")}
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = [root / "zaremba_small" / f"seed-{s}" / "checkpoint.pt" for s in (1, 2)]
    deadline = time.monotonic() + 120
    while not all(c.exists() for c in checkpoints) and time.monotonic() < deadline:  # both trainings past epoch 1
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and err.strip().count("\n") == 0
    for log in ("train_zaremba_small_seed_1.log", "train_zaremba_small_seed_2.log"):
        assert "Resume with the same command" in (root / "logs" / log).read_text()
    dry = subprocess.run([*args, "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert dry.stdout.count("continues from its checkpoint") == 2


def test_bad_folders_and_a_second_command_on_the_same_root_are_refused_before_any_work(tmp_path: Path):
    from lm.infra.checkpoint import RunFolderError, RunFolderLock
    from lm.infra.errors import UsageError

    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="--root: cannot write"):
        reproduce(tmp_path / "file" / "table1", ["gal"], 1, 2, 1, 2, [])
    with pytest.raises(UsageError, match="--data-dir: .* is not a folder"):
        reproduce(tmp_path / "table1", ["gal"], 1, 2, 1, 2, [], str(tmp_path / "missing"))
    with RunFolderLock(tmp_path / "table1"):
        with pytest.raises(RunFolderError, match="in use by another run"):
            reproduce(tmp_path / "table1", ["gal"], 1, 2, 1, 2, [])
    assert not (tmp_path / "table1" / "logs").exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_command_takes_its_trainings_with_it_after_a_checkpoint(tiny_corpus: Path, tmp_path: Path):
    """SIGKILL leaves the command no time to pass a signal on: the kernel sends each training SIGTERM."""
    root = tmp_path / "table1"
    args = [
        sys.executable,
        "-m",
        "lm.reproduce",
        "--root",
        str(root),
        "--parts",
        "small",
        "--small-models",
        "1",
        "--data-dir",
        str(tiny_corpus),
        *(f"--train-arg={a}" for a in [*TINY, "trainer.epochs=200"]),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "LM_FAULT")}
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = root / "zaremba_small" / "seed-1" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    process.kill()
    process.wait()
    log = root / "logs" / "train_zaremba_small_seed_1.log"
    while "Resume with the same command" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "stopped by SIGTERM" in log.read_text()
