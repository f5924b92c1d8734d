"""Crash safety, interrupts and numerical faults: nothing is lost, resumed runs match."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lm.model.language_model
from lm.engine.training import train
from lm.infra.checkpoint import load_checkpoint
from lm.infra.faults import NonFiniteError, TrainingInterrupted

from helpers import REPO, tiny_overrides, train_config

DETERMINISTIC_EPOCH_KEYS = ("epoch", "lr", "train_ppl", "valid_ppl", "steps", "skipped_steps", "grad_norm")


def _deterministic(metrics: dict) -> dict:
    keep = ("valid_ppl", "test_ppl", "eval", "best_valid_ppl", "steps", "test_predictions", "config")
    out = {k: metrics[k] for k in keep}
    out["epochs"] = [{k: e[k] for k in DETERMINISTIC_EPOCH_KEYS} for e in metrics["epochs"]]
    out["config"] = {**metrics["config"], "trainer": {**metrics["config"]["trainer"], "resume": None}}
    return out


def _launch(args: list[str], fault: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "LM_FAULT")}
    if fault:
        env["LM_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "lm.train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_kills_and_signals_anywhere_then_resume_gives_the_uninterrupted_run(tiny_corpus: Path, tmp_path: Path):
    args = tiny_overrides(tiny_corpus, "trainer.epochs=3")  # 81 windows per epoch
    reference = _launch([*args, f"hydra.run.dir={tmp_path / 'reference'}"])
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    run_dir = tmp_path / "faulty"
    resume = [*args, f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    faults = [  # (fault, expected exit code): in the order training reaches them
        ("step:30:KILL", -signal.SIGKILL),  # inside epoch 1, before any checkpoint
        ("step:50:TERM", 128 + signal.SIGTERM),  # graceful: mid-epoch checkpoint
        ("step:70:INT", 128 + signal.SIGINT),  # Ctrl-C: resumes mid-epoch from step 50
        ("eval:1:KILL", -signal.SIGKILL),  # during the epoch-end evaluation
        ("checkpoint:1:KILL", -signal.SIGKILL),  # checkpoint written but not yet renamed
        ("step:150:KILL", -signal.SIGKILL),  # inside epoch 2
        ("eval:3:KILL", -signal.SIGKILL),
        ("checkpoint:3:KILL", -signal.SIGKILL),
    ]
    for fault, code in faults:
        proc = _launch(resume, fault)
        assert proc.wait(timeout=300) == code, (fault, proc.stderr.read())
        if fault.endswith(("TERM", "INT")):
            message = proc.stderr.read().strip().splitlines()
            assert len(message) == 1 and "trainer.resume=auto" in message[0], message
        if fault.startswith("checkpoint"):
            assert list(run_dir.glob("checkpoint.pt.*.tmp")), "the half-written checkpoint should be left behind"
    rng = random.Random(0)
    for _ in range(2):  # and at moments nobody chose
        proc = _launch(resume)
        time.sleep(rng.uniform(1.0, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    final = _launch(resume)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert not list(run_dir.glob("checkpoint.pt.*.tmp"))

    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    actual = json.loads((run_dir / "metrics.json").read_text())
    assert _deterministic(actual) == _deterministic(expected)
    a = load_checkpoint(tmp_path / "reference" / "checkpoint.pt")["model"]
    b = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.full
def test_sigterm_mid_epoch_checkpoints_and_resumes_bit_identically(tiny_corpus, tmp_path, monkeypatch):
    straight = train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2")), tmp_path / "a")
    monkeypatch.setenv("LM_FAULT", "step:40:TERM")
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM in epoch 1 at step 40.*trainer.resume=auto") as info:
        train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2")), tmp_path / "b")
    assert info.value.exit_code == 143
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and ckpt["partial_epoch"]["window"] == 40
    monkeypatch.delenv("LM_FAULT")
    resumed = train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2", "trainer.resume=auto")), tmp_path / "b")
    assert _deterministic(resumed) == _deterministic(straight)
    # the wall time of a resumed run counts both processes
    assert straight["sessions"] == 1 and resumed["sessions"] == 2
    assert resumed["wall_seconds"] > ckpt["wall_seconds"] > 0


def _poison_forward(monkeypatch, at_call: int) -> None:
    """Make the model's training forward pass (``features``, which the fused loss reads) return
    NaN on its ``at_call``-th call."""
    original = lm.model.language_model.LanguageModel.features
    calls = {"n": 0}

    def features(self, x, state):
        hidden, state = original(self, x, state)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                hidden = hidden * float("nan")
        return hidden, state

    monkeypatch.setattr(lm.model.language_model.LanguageModel, "features", features)


@pytest.mark.full
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=1")), tmp_path)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    bad_step = load_checkpoint(tmp_path / "checkpoint.pt")["step"] + 5
    _poison_forward(monkeypatch, at_call=5)
    with pytest.raises(
        NonFiniteError,
        match=rf"non-finite loss or gradient norm at epoch 2, step {bad_step}; stopped, the last good checkpoint is",
    ):
        train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2", "trainer.resume=auto")), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_nonfinite_skip_mode_counts_skipped_steps(tiny_corpus, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, at_call=5)
    metrics = train(train_config(tiny_overrides(tiny_corpus, "trainer.nonfinite=skip", "trainer.max_steps=20")), tmp_path)
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 20
    assert metrics["valid_ppl"] < 1e4


# ------------------------------------------------------------- the reliability issue's faults, as a table

import hashlib  # noqa: E402

from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from lm import train as train_module  # noqa: E402
from lm.engine import epochs as epochs_module  # noqa: E402
from lm.engine import run as run_module  # noqa: E402
from lm.engine import step as step_module  # noqa: E402


def _entry(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``python -m lm.train ARGV`` in this process: (exit code, stderr); 0 when it returns."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        train_module._hydra_entry()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


def _one_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (".lock", "train.log")
    }


# (fault, exit code, message, checkpoint of every epoch): a stop anywhere after the epoch loop
# ends the run with its line, and no metrics.json; trainer.resume=auto then finishes it.
SIGNAL_CASES = [
    ("eval:1:TERM", 143, "stopped by SIGTERM after epoch 1"),  # during the last validation
    ("eval:1:USR1", 138, "stopped by SIGUSR1 after epoch 1"),
    ("eval:1:INT", 130, "stopped by SIGINT after epoch 1"),
    ("final:1:TERM", 143, "stopped by SIGTERM during the final evaluation"),
    ("final:1:USR1", 138, "stopped by SIGUSR1 during the final evaluation"),
    ("final:1:INT", 130, "stopped by SIGINT during the final evaluation"),
    ("checkpoint:1:TERM", 143, "stopped by SIGTERM after epoch 1"),  # while the last checkpoint is written
]


@pytest.mark.parametrize("fault, code, message", SIGNAL_CASES, ids=[c[0] for c in SIGNAL_CASES])
@pytest.mark.full
def test_signals_after_the_epoch_loop_stop_the_run_with_one_line(
    fault, code, message, tiny_corpus, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    args = [*tiny_overrides(tiny_corpus, "trainer.epochs=1"), f"hydra.run.dir={run}"]
    monkeypatch.setenv("LM_FAULT", fault)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # pytest has no SIGUSR1 handler to pass the signal on to
    try:
        got, err = _entry(args, monkeypatch, capsys)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == code, err
    _one_line(err, message)
    assert "trainer.resume=auto" in err
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    monkeypatch.delenv("LM_FAULT")
    got, err = _entry([*args, "trainer.resume=auto"], monkeypatch, capsys)
    assert got == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["completed"] and metrics["sessions"] == 2


def test_a_stop_while_setting_up_writes_no_checkpoint(tiny_corpus, tmp_path, monkeypatch, capsys):
    real = run_module.load_data

    def load_data_then_sigterm(data):
        corpus = real(data)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. while PTB is read
        return corpus

    monkeypatch.setattr(run_module, "load_data", load_data_then_sigterm)
    run = tmp_path / "run"
    got, err = _entry([*tiny_overrides(tiny_corpus), f"hydra.run.dir={run}"], monkeypatch, capsys)
    assert got == 143, err
    _one_line(err, "stopped by SIGTERM before the first step; no checkpoint written")
    assert not (run / "checkpoint.pt").exists()
    monkeypatch.undo()
    assert train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=2")), run)["steps"] == 2  # the same command again


def test_a_second_ctrl_c_stops_at_once_with_one_line(tiny_corpus, tmp_path, monkeypatch, capsys):
    def twice(point: str, index: int) -> None:
        if point == "step" and index == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(step_module, "fault_point", twice)  # the step's own fault point
    got, err = _entry([*tiny_overrides(tiny_corpus), f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert got == 130, err
    _one_line(err, "stopped by SIGINT (Ctrl-C)")


NONFINITE_CASES = [
    ("huge-lr", ["optim.lr=1e30", "optim.max_grad_norm=1e30"], "non-finite"),
    ("overflowing-perplexity", [], "non-finite perplexity at epoch 1"),
]


@pytest.mark.parametrize("case, extra, message", NONFINITE_CASES, ids=[c[0] for c in NONFINITE_CASES])
def test_nonfinite_training_exits_3_with_one_line(case, extra, message, tiny_corpus, tmp_path, monkeypatch, capsys):
    if case == "overflowing-perplexity":  # a loss too large for exp(): finite NLL, infinite perplexity
        monkeypatch.setattr(epochs_module, "evaluate", lambda model, data, window: (1e6, 10))
    run = tmp_path / "run"
    got, err = _entry([*tiny_overrides(tiny_corpus, "trainer.epochs=1", *extra), f"hydra.run.dir={run}"], monkeypatch, capsys)
    assert got == 3, err
    _one_line(err, message)
    assert not (run / "metrics.json").exists()


@pytest.mark.full
def test_max_steps_run_continued_is_not_completed(tiny_corpus, tmp_path):
    from lm.reporting.results import find_runs
    from lm.reporting.tables import comparison_table

    run = tmp_path / "run"
    train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2", "trainer.max_steps=5")), run)
    metrics = train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2", "trainer.resume=auto")), run)
    assert metrics["epochs"][0]["steps"] == 5 and not metrics["completed"]
    assert "| `run` |" not in comparison_table(find_runs(tmp_path))


@pytest.mark.full
def test_resume_auto_of_a_finished_run_changes_nothing(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=3")), run)
    before = _files(run)
    train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=3", "trainer.resume=auto")), run)
    assert _files(run) == before


def test_overwrite_replaces_the_whole_run(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=3")), run)
    numbers = {"valid": {"batched": {"ppl": 9.0}}, "test": {"stream": {"ppl": 9.0}}}  # lm.evaluate's, of this run
    (run / "eval.json").write_text(json.dumps({"checkpoint": str(run / "checkpoint.pt"), "results": numbers}))
    (run / "notes.txt").write_text("mine\n")  # not the run's: it stays
    metrics = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=2", "trainer.overwrite=true")), run)
    assert metrics["steps"] == 2 and metrics["sessions"] == 1 and not (run / "eval.json").exists()
    assert len(list((run / "tb").iterdir())) == 1  # the old event file went with the old run
    assert (run / "notes.txt").read_text() == "mine\n"


def test_allowed_changes_are_recorded(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2", "trainer.max_steps=3")), run)
    metrics = train(
        train_config(
            tiny_overrides(
                tiny_corpus,
                "trainer.epochs=2",
                "trainer.max_steps=6",
                "trainer.resume=auto",
                "optim.lr=0.5",
                "trainer.allow_changes=[optim.lr]",
            )
        ),
        run,
    )
    assert metrics["resume_changes"] == [{"key": "optim.lr", "from": 1.0, "to": 0.5, "step": 3}]


def test_the_data_cache_is_keyed_by_content_not_mtime(tiny_corpus):
    from lm.data.corpus import load_corpus

    first = load_corpus(tiny_corpus)
    path = tiny_corpus / "train.txt"
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace("cat", "cow"))  # same size, and the old mtime put back (cp -p, tar, rsync -t)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_corpus(tiny_corpus)
    assert "cow" in second.vocab and "cat" not in second.vocab and "cat" in first.vocab


@pytest.mark.full
def test_a_sweep_names_its_jobs_without_equals_or_commas_and_a_rerun_replaces_nothing(tiny_corpus, tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny_overrides(tiny_corpus, "trainer.max_steps=1"), "model.dropout=0.1,0.2", f"hydra.sweep.dir={sweep}"]
    got, err = _entry(args, monkeypatch, capsys)
    assert got == 0, err
    jobs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(jobs) == 2 and not any("=" in str(p.relative_to(sweep)) or "," in str(p.relative_to(sweep)) for p in jobs), jobs
    assert jobs[0].name.endswith("_trainer.max_steps-1") and "model.dropout-0.1" in jobs[0].name
    before = {job: _files(job) for job in jobs}
    got, err = _entry(args, monkeypatch, capsys)
    assert got == 2, err
    _one_line(err, "already holds a finished run")
    assert {job: _files(job) for job in jobs} == before


# ------------------------------------------------------------- make targets: exit codes passed through


def _make(target: str, *variables: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "LM_FAULT", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(env_extra or {})
    stamp = venv / ".installed"
    return subprocess.run(
        ["make", "--no-print-directory", "-o", str(stamp), "-o", "data", f"VENV={venv}", target, *variables],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _own_lines(stderr: str) -> list[str]:
    """stderr without make's own lines (``make: *** [...] Error N``) and the shell's echo of a killed job."""
    return [
        line
        for line in stderr.strip().splitlines()
        if not re.match(r"make(\[\d+\])?: ", line) and line.strip() not in ("Terminated", "Interrupt")
    ]


@pytest.mark.slow
def test_make_targets_pass_exit_codes_through(tiny_corpus, tmp_path):
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    run = tmp_path / "a run=1,x"
    args = " ".join([*tiny_overrides(tiny_corpus, "trainer.epochs=1"), f"'hydra.run.dir={run}'"])
    stopped = _make("train-small", f"ARGS={args}", env_extra={"LM_FAULT": "step:3:TERM"})
    assert stopped.returncode == -signal.SIGTERM, stopped.stderr  # make ends by the same signal: 143 in a shell
    assert len(_own_lines(stopped.stderr)) == 1 and "trainer.resume=auto" in stopped.stderr
    evaluated = _make("eval", f"CKPT={run / 'checkpoint.pt'}", f"ARGS=data_dir={tiny_corpus} output={tmp_path / 'e.json'}")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "e.json").read_text())["checkpoint"] == str(run / "checkpoint.pt")
    missing = _make("eval")
    assert missing.returncode == 2 and _own_lines(missing.stderr) == ["error: give CKPT=path/to/checkpoint.pt"]
    absent = _make("eval", f"CKPT={tmp_path / 'none.pt'}")
    assert absent.returncode == 2 and len(_own_lines(absent.stderr)) == 1 and "does not exist" in absent.stderr


def test_make_help_lists_every_target_as_a_user_types_it():
    """Every phony target has a help line, and the variables read as a shell spells them
    ($LM_DATA_DIR, not the Makefile's escaped $$LM_DATA_DIR)."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    shown = _make("help")
    assert shown.returncode == 0, shown.stderr
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    listed = re.findall(r"^  make (\S+)", shown.stdout, re.M)
    assert sorted(listed) == sorted(phony)
    assert "$$" not in shown.stdout and "$LM_DATA_DIR" in shown.stdout
