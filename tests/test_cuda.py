"""The CUDA path against the CPU one: the same tiny run, the same numbers to float tolerance.
Skipped where torch sees no GPU; `make gpu-check` runs them there (`pytest -m cuda`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lm.data.batching import batchify, bptt_windows
from lm.engine.evaluation import evaluate
from lm.engine.training import train
from lm.model.language_model import LanguageModel

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
    model = LanguageModel(50, 16, 2, 0.0, 0.1).eval()
    ids = torch.randint(0, 50, (2001,))
    for streams, window in ((20, 5), (1, 500)):
        data = batchify(ids, streams)
        cpu_nll, cpu_tokens = evaluate(model, data, window)
        cuda_nll, cuda_tokens = evaluate(model.cuda(), data.cuda(), window)
        model.cpu()
        assert cuda_tokens == cpu_tokens
        assert cuda_nll == pytest.approx(cpu_nll, rel=1e-3)


def test_recurrent_dropout_variant_trains_on_cuda(shared_tiny_corpus, tmp_path):
    """The variants that mask h_{t-1} run the cell's own time loop instead of cuDNN, compiled."""
    from lm.model.cells.lstm import LSTMLayer

    compiled_window = LSTMLayer.compiled_window

    metrics = _two_steps(shared_tiny_corpus, tmp_path, "cuda", "model.dropout_variant=recurrent", "model.dropout_recurrent=0.3")
    assert metrics["steps"] == 2 and math.isfinite(metrics["valid_ppl"])
    assert not compiled_window().failed, compiled_window().status()  # torch.compile (Triton) worked here
    assert metrics["step_paths"]["time_loop"]["path"] == "compiled step (torch.compile)"


def _graphed_against_eager(variant: str, windows: int = 8, **rates) -> tuple[float, dict, list[float]]:
    """The same start trained with the step replayed as a CUDA graph and eagerly, no dropout draws
    shared between them (rates 0 but the masked time loop's, whose masks differ): the largest parameter
    difference, the graphs' status and both runs' summed NLL."""
    from lm.engine.step import StepOptions, graphs_status, train_epoch

    ids = torch.randint(0, 50, (4 * (5 * windows + 1),), generator=torch.Generator().manual_seed(0))
    data = bptt_windows(batchify(ids, 4).cuda(), 5)
    models, nll = {}, []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(50, 16, 2, 0.0, 0.1, variant=variant, **rates).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=1.0, foreach=True)
        nll.append(train_epoch(model, data, opt, StepOptions(max_grad_norm=0.5, cuda_graphs=graphed)).nll)
        models[graphed] = model
    diff = max(float((a - b).abs().max()) for a, b in zip(models[False].parameters(), models[True].parameters()))
    return diff, graphs_status(models[True]), nll


def test_the_step_replayed_as_a_cuda_graph_trains_as_the_eager_step():
    """cuDNN's LSTM, clipping and the SGD update captured once and replayed: the eager step's parameters
    to float tolerance (the graph's update rounds once more), every step after the warm-up replayed."""
    diff, status, nll = _graphed_against_eager("zaremba")
    assert status["failure"] is None, status
    assert (status["eager_steps"], status["replayed_steps"]) == (3, 5)
    assert diff < 1e-4 and nll[1] == pytest.approx(nll[0], rel=1e-4)


def test_the_masked_time_loop_compiled_inside_a_cuda_graph():
    """Gal's variational layers: the compiled step of the time loop and fresh masks at every replay
    (the generator is graph-safe), captured without a failure, training to a finite loss."""
    rates = dict(dropout_embedding=0.2, dropout_input=0.35, dropout_recurrent=0.2, dropout_output=0.35)
    _, status, nll = _graphed_against_eager("variational", **rates)
    assert status["failure"] is None and status["replayed_steps"] == 5, status
    assert all(math.isfinite(x) for x in nll)


def test_a_graphed_epoch_waits_for_the_gpu_only_at_its_end():
    """No host sync per step: the syncs of an epoch of 30 replayed windows are those of an epoch of 10."""
    import warnings

    from lm.engine.step import StepOptions, train_epoch

    torch.manual_seed(0)
    model = LanguageModel(50, 16, 2, 0.3, 0.1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, foreach=True)
    data = bptt_windows(batchify(torch.randint(0, 50, (4 * 151,)), 4).cuda(), 5)  # 30 windows
    options = StepOptions(max_grad_norm=5.0)
    train_epoch(model, data[:5], opt, options)  # warm-up and capture

    def syncs(windows) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_epoch(model, windows, opt, options, log_every=4)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(data[:10]) == syncs(data) <= 4  # the non-finite check and the epoch's sums, read once


def test_monte_carlo_evaluation_compiles_nothing():
    """Dropout on at evaluation, h_{t-1} masked, windows of 500 and odd lengths: the eager loop, no compile."""
    from lm.engine.evaluation import evaluate_mc
    from lm.model.cells.lstm import LSTMLayer

    compiled_window = LSTMLayer.compiled_window

    torch.manual_seed(0)
    model = LanguageModel(50, 16, 2, 0.0, 0.1, variant="variational", dropout_recurrent=0.3).cuda()
    before = compiled_window().status()
    nll, count = evaluate_mc(model, batchify(torch.randint(0, 50, (1237,)), 1).cuda(), 500, samples=3)
    assert math.isfinite(nll) and count == 1236
    assert compiled_window().status() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_window_on_cuda_is_the_eager_window(dtype):
    """torch.compile's window on the GPU: the values and gradients of LSTMWindow, per-step masks."""
    from lm.model.cells.lstm import LSTMWindow

    from helpers import LSTMCompiled

    torch.manual_seed(0)
    steps, batch, hidden = 6, 4, 16  # the tiny model's shapes: its fp32 step graphs serve the test above too
    x_proj = torch.randn(steps, batch, 4 * hidden, device="cuda", requires_grad=True)
    w_hh = torch.randn(4 * hidden, hidden, device="cuda", requires_grad=True)
    h0, c0 = torch.randn(batch, hidden, device="cuda"), torch.randn(batch, hidden, device="cuda")
    mask = (torch.rand(steps, batch, hidden, device="cuda") > 0.3) / 0.7
    results = []
    for fn in (LSTMWindow.apply, LSTMCompiled()):
        out, h, c = fn(x_proj, h0, c0, w_hh, mask, dtype)
        (out.sin().sum() + c.sum()).backward()
        results.append([out.detach(), c.detach(), x_proj.grad.clone(), w_hh.grad.clone()])
        x_proj.grad = w_hh.grad = None
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_gru_window_on_cuda_is_the_eager_loop(dtype):
    """The GRU's compiled step on the GPU: the values and gradients of its plain loop, per-step masks."""
    from lm.model.cells.gru import gru_step
    from lm.model.cells.loop import CompiledWindow, window_loop

    torch.manual_seed(0)
    steps, batch, hidden = 6, 4, 16
    x_proj = torch.randn(steps, batch, 3 * hidden, device="cuda", requires_grad=True)
    w_hh = torch.randn(3 * hidden, hidden, device="cuda", requires_grad=True)
    b_hn = torch.randn(hidden, device="cuda", requires_grad=True)
    h0 = torch.randn(batch, hidden, device="cuda")
    mask = (torch.rand(steps, batch, hidden, device="cuda") > 0.3) / 0.7
    compiled = CompiledWindow(gru_step, "GRU")
    results = []
    for fn in (lambda *args: window_loop(gru_step, *args), compiled):
        out, (h,) = fn(x_proj, (h0,), (w_hh.to(dtype).t(), b_hn), mask, dtype)
        (out.sin().sum() + h.sum()).backward()
        results.append([out.detach(), h.detach(), x_proj.grad.clone(), w_hh.grad.clone(), b_hn.grad.clone()])
        x_proj.grad = w_hh.grad = b_hn.grad = None
    assert not compiled.failed
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3 if dtype == torch.float32 else 2e-2)


def test_a_gru_model_trains_on_cuda_under_the_masked_variant(shared_tiny_corpus, tmp_path):
    gru = ("model.cell=gru", "model.dropout_variant=variational", "model.dropout_recurrent=0.3")
    metrics = _two_steps(shared_tiny_corpus, tmp_path, "cuda", *gru)
    assert math.isfinite(metrics["test_ppl"]) and metrics["config"]["model"]["cell"] == "gru"
    assert metrics["step_paths"]["time_loop"]["path"] == "compiled step (torch.compile)"
