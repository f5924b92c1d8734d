"""The CUDA path against the CPU one: the same tiny run, the same numbers to float tolerance.
Skipped where torch sees no GPU; `make gpu-check` runs them there (`pytest -m cuda`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lm.data.batching import batchify
from lm.engine.evaluation import evaluate
from lm.engine.training import train
from lm.model.language_model import LSTMLanguageModel

from helpers import tiny_overrides, train_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")]


def _two_steps(corpus: Path, out: Path, device: str, *extra: str) -> dict:
    """Metrics of 2 steps of the tiny model without dropout (CPU and GPU draw different masks)."""
    overrides = [
        o
        for o in tiny_overrides(corpus, "trainer.max_steps=2", "model.dropout=0.0", *extra)
        if not o.startswith("trainer.device=")
    ]
    return train(train_config([*overrides, f"trainer.device={device}"]), out / device)


# fp32 is IEEE fp32 on the GPU too (trainer.tf32=false): only the order of reductions differs;
# bf16 products differ in rounding between the two devices' kernels
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_two_training_steps_on_cuda_match_cpu(precision, tolerance, shared_tiny_corpus, tmp_path):
    runs = {d: _two_steps(shared_tiny_corpus, tmp_path / precision, d, f"trainer.precision={precision}") for d in ("cpu", "cuda")}
    assert runs["cuda"]["device"].startswith("cuda")
    assert runs["cuda"]["precision"]["products"] == ("ieee fp32" if precision == "fp32" else "bf16 (autocast), fp32 accumulation")
    assert runs["cuda"]["hardware"]["gpu"]
    for key in ("valid_ppl", "test_ppl"):
        assert math.isfinite(runs["cuda"][key])
        assert runs["cuda"][key] == pytest.approx(runs["cpu"][key], rel=tolerance)


def test_evaluation_on_cuda_matches_cpu():
    """Both protocols' shapes (20 streams in windows, one stream in long windows) give the CPU's NLL."""
    torch.manual_seed(0)
    model = LSTMLanguageModel(50, 16, 2, 0.0, 0.1).eval()
    ids = torch.randint(0, 50, (2001,))
    for streams, window in ((20, 5), (1, 500)):
        data = batchify(ids, streams)
        cpu_nll, cpu_tokens = evaluate(model, data, window)
        cuda_nll, cuda_tokens = evaluate(model.cuda(), data.cuda(), window)
        model.cpu()
        assert cuda_tokens == cpu_tokens
        assert cuda_nll == pytest.approx(cpu_nll, rel=1e-3)


def test_recurrent_dropout_variant_trains_on_cuda(shared_tiny_corpus, tmp_path):
    """The variants that mask h_{t-1} run the time loop of lm.recurrence instead of cuDNN, compiled."""
    from lm.model.recurrence import compiled_window

    metrics = _two_steps(shared_tiny_corpus, tmp_path, "cuda", "model.dropout_variant=recurrent", "model.dropout_recurrent=0.3")
    assert metrics["steps"] == 2 and math.isfinite(metrics["valid_ppl"])
    assert not compiled_window().failed  # torch.compile (Triton) worked here, or one warning said why not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_window_on_cuda_is_the_eager_window(dtype):
    """torch.compile's window on the GPU: the values and gradients of LSTMWindow, per-step masks."""
    from lm.model.recurrence import CompiledWindow, LSTMWindow

    torch.manual_seed(0)
    steps, batch, hidden = 6, 4, 8
    x_proj = torch.randn(steps, batch, 4 * hidden, device="cuda", requires_grad=True)
    w_hh = torch.randn(4 * hidden, hidden, device="cuda", requires_grad=True)
    h0, c0 = torch.randn(batch, hidden, device="cuda"), torch.randn(batch, hidden, device="cuda")
    mask = (torch.rand(steps, batch, hidden, device="cuda") > 0.3) / 0.7
    results = []
    for fn in (LSTMWindow.apply, CompiledWindow()):
        out, h, c = fn(x_proj, h0, c0, w_hh, mask, dtype)
        (out.sin().sum() + c.sum()).backward()
        results.append([out.detach(), c.detach(), x_proj.grad.clone(), w_hh.grad.clone()])
        x_proj.grad = w_hh.grad = None
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3 if dtype == torch.float32 else 2e-2)
