"""Sweeps through Hydra launchers, and preemption as SLURM does it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lm.config import compose
from lm.engine.training import train
from lm.infra.faults import TrainingInterrupted
from lm.reporting.results import find_runs

from helpers import REPO, tiny_overrides, train_config


@pytest.mark.slow
def test_joblib_sweep_writes_one_run_per_job(tiny_corpus: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "LM_FAULT")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm.train",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            *tiny_overrides(tiny_corpus, "trainer.max_steps=5"),
            "trainer.seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = find_runs(sweep)
    assert sorted(r.metrics["seed"] for r in runs) == [1, 2]
    assert len({r.path for r in runs}) == 2  # each job its own folder


def test_slurm_launcher_config_composes_with_overrides():
    cfg = compose(
        "train",
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=30",
            "hydra.launcher.gpus_per_node=4",
        ],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 30, 4)
    assert launcher.max_num_timeout > 0  # requeue after a time limit


@pytest.mark.full
def test_sigusr1_checkpoints_passes_the_signal_on_and_resumes_identically(tiny_corpus, tmp_path, monkeypatch):
    """What SLURM + submitit do before a time limit: SIGUSR1, checkpoint, requeue, resume."""
    straight = train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2")), tmp_path / "a")
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))  # stands in for submitit
    try:
        monkeypatch.setenv("LM_FAULT", "step:100:USR1")
        with pytest.raises(TrainingInterrupted, match="stopped by SIGUSR1 in epoch 2"):
            train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2")), tmp_path / "b")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [signal.SIGUSR1]
    monkeypatch.delenv("LM_FAULT")
    resumed = train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=2", "trainer.resume=auto")), tmp_path / "b")
    assert [e["train_ppl"] for e in resumed["epochs"]] == [e["train_ppl"] for e in straight["epochs"]]
    assert resumed["test_ppl"] == straight["test_ppl"]
