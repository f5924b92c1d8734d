"""What a GPU run relies on, checked on a CPU: which generators a checkpoint saves and restores,
the precision contract (IEEE fp32 unless trainer.tf32, native bf16 only), recorded in metrics.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.config import ConfigError
from lm.engine.run import _set_up_processes
from lm.engine.runtime import fp32_products
from lm.engine.training import train
from lm.infra.checkpoint import rng_digest, rng_state, set_rng_state

from helpers import tiny_overrides, train_config

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with one GPU whose generator calls are recorded (no CUDA needed)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", device)) or torch.zeros(8, dtype=torch.uint8)
    )
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", device, int(state[0]))))
    for name in ("get_rng_state_all", "set_rng_state_all"):  # touching every GPU is what must not happen
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name, **k: pytest.fail(f"torch.cuda.{name} called"))
    return calls


def test_a_cpu_run_never_touches_a_gpu_generator(fake_cuda):
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch"}
    set_rng_state({**state, "cuda": [torch.ones(8, dtype=torch.uint8)] * 3}, torch.device("cpu"))
    assert fake_cuda == []


def test_a_gpu_run_saves_and_restores_its_own_gpu_only(fake_cuda):
    state = rng_state(CUDA0)
    assert fake_cuda == [("get", CUDA0)] and set(state) == {"torch", "cuda"}
    set_rng_state(state, CUDA0)
    assert fake_cuda[-1] == ("set", CUDA0, 0)


def test_an_old_checkpoint_with_more_gpus_than_here_restores_the_first(fake_cuda):
    """Checkpoints written before held one state per visible GPU: 4 states on a 1-GPU machine is no IndexError."""
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    set_rng_state({"torch": torch.get_rng_state(), "cuda": states}, CUDA0)
    assert fake_cuda == [("set", CUDA0, 0)]  # rank 0's device: the one the run drew from


def test_rng_digest_tells_states_apart():
    torch.manual_seed(1)
    a = rng_state()
    torch.rand(1)
    assert rng_digest(a) != rng_digest(rng_state()) and rng_digest(a) == rng_digest({"torch": a["torch"].clone()})
    assert 0 <= rng_digest(a) < 2**63


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_products_sets_cublas_and_cudnn_alike_and_restores_them(tf32):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with fp32_products(tf32):
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_emulated_bf16_is_refused_in_one_line(monkeypatch, tiny_corpus: Path):
    """T4 and V100 report bf16 support through emulation: a bf16 run there is refused, not slow."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    cfg = train_config(tiny_overrides(tiny_corpus, "trainer.device=cuda", "trainer.precision=bf16"))
    with pytest.raises(ConfigError, match="no native bf16"):
        _set_up_processes(cfg)


def test_metrics_record_the_precision_contract(tiny_corpus: Path, tmp_path: Path):
    metrics = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=2", "trainer.tf32=true")), tmp_path / "run")
    assert metrics["precision"]["trainer.precision"] == "fp32"
    assert metrics["precision"]["tf32"] is False  # a CPU run: tf32 has no effect, and says so
    assert metrics["precision"]["products"] == "ieee fp32"
    assert metrics["config"]["trainer"]["tf32"] is True


def test_tf32_is_a_config_value_checked_at_start():
    with pytest.raises(Exception, match="tf32"):
        train_config(["trainer.tf32=sometimes"])
