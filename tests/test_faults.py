"""Crash safety, interrupts and numerical faults: nothing is lost, resumed runs match."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lm.model
from lm.checkpoint import load_checkpoint
from lm.faults import NonFiniteError, TrainingInterrupted
from lm.train import train

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
    return subprocess.Popen([sys.executable, "-m", "lm.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kills_and_signals_anywhere_then_resume_gives_the_uninterrupted_run(tiny_corpus: Path, tmp_path: Path):
    args = tiny_overrides(tiny_corpus, "trainer.epochs=3")  # 81 windows per epoch
    reference = _launch([*args, f"hydra.run.dir={tmp_path / 'reference'}"])
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    run_dir = tmp_path / "faulty"
    resume = [*args, f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    faults = [  # (fault, expected exit code): in the order training reaches them
        ("step:30:KILL", -signal.SIGKILL),       # inside epoch 1, before any checkpoint
        ("step:50:TERM", 128 + signal.SIGTERM),  # graceful: mid-epoch checkpoint
        ("step:70:INT", 128 + signal.SIGINT),    # Ctrl-C: resumes mid-epoch from step 50
        ("eval:1:KILL", -signal.SIGKILL),        # during the epoch-end evaluation
        ("checkpoint:1:KILL", -signal.SIGKILL),  # checkpoint written but not yet renamed
        ("step:150:KILL", -signal.SIGKILL),      # inside epoch 2
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
    original = lm.model.LSTMLanguageModel.features
    calls = {"n": 0}

    def features(self, x, state):
        hidden, state = original(self, x, state)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                hidden = hidden * float("nan")
        return hidden, state

    monkeypatch.setattr(lm.model.LSTMLanguageModel, "features", features)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=1")), tmp_path)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    bad_step = load_checkpoint(tmp_path / "checkpoint.pt")["step"] + 5
    _poison_forward(monkeypatch, at_call=5)
    with pytest.raises(NonFiniteError, match=rf"non-finite loss or gradient norm at epoch 2, step {bad_step}; stopped, the last good checkpoint is"):
        train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2", "trainer.resume=auto")), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_nonfinite_skip_mode_counts_skipped_steps(tiny_corpus, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, at_call=5)
    metrics = train(train_config(tiny_overrides(tiny_corpus, "trainer.nonfinite=skip", "trainer.max_steps=20")), tmp_path)
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 20
    assert metrics["valid_ppl"] < 1e4
