"""Data-parallel training with torchrun (gloo on CPU) matches single-process training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.checkpoint import load_checkpoint
from lm.train import train

from helpers import REPO, tiny_overrides, train_config


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_corpus: Path, tmp_path: Path):
    overrides = tiny_overrides(tiny_corpus, "model.dropout=0.0", "trainer.epochs=2", "trainer.max_steps=60")
    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "LM_FAULT")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lm.train",
         *overrides, f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = train(train_config(overrides), tmp_path / "single")
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["processes"] == 2 and ddp["steps"] == single["steps"] == 60
    a = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert ddp["epochs"][0]["train_ppl"] == pytest.approx(single["epochs"][0]["train_ppl"], rel=1e-5)
    assert ddp["valid_ppl"] == pytest.approx(single["valid_ppl"], rel=1e-4)
    assert ddp["test_ppl"] == pytest.approx(single["test_ppl"], rel=1e-4)
