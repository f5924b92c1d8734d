"""The training step replayed as a CUDA graph (lm.engine.graphs, lm.engine.step.GraphedStep), checked
on a CPU: LM_CUDA_GRAPHS=emulate runs the same bookkeeping (warm-up, capture per window shape, static
buffers rewritten by every replay, the lr in a device tensor, eager steps for other shapes, the
fallback after a failed capture) with an emulated graph. test_cuda.py checks the real one on a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lm.data.batching import batchify, bptt_windows
from lm.engine import graphs
from lm.engine.step import StepOptions, graphs_not_applicable, graphs_status, train_epoch
from lm.engine.training import train
from lm.model.language_model import LanguageModel

from helpers import tiny_overrides, train_config

VOCAB, HIDDEN, BATCH, BPTT = 40, 12, 4, 5
RATES = {
    "zaremba": {},
    "variational": dict(dropout_embedding=0.1, dropout_input=0.3, dropout_recurrent=0.2, dropout_output=0.3),
}


def _windows(full: int = 9) -> list:
    """``full`` windows of BPTT steps and a shorter last one (as an epoch of PTB ends)."""
    ids = torch.randint(0, VOCAB, (BATCH * (BPTT * full + 3),), generator=torch.Generator().manual_seed(5))
    windows = bptt_windows(batchify(ids, BATCH), BPTT)
    assert len(windows) == full + 1 and windows[-1][0].size(1) < BPTT
    return windows


def _two_epochs(variant: str, logs: list | None = None) -> tuple[LanguageModel, list]:
    """Two epochs at two learning rates, as a run's schedule changes it; returns the model and each epoch's progress."""
    torch.manual_seed(0)
    model = LanguageModel(VOCAB, HIDDEN, 2, 0.3, 0.1, variant=variant, **RATES[variant])
    opt = torch.optim.SGD(model.parameters(), lr=1.0, foreach=True)
    windows, options = _windows(), StepOptions(max_grad_norm=0.5, weight_decay=1e-4)
    epochs = []
    for lr in (1.0, 0.5):
        opt.param_groups[0]["lr"] = lr
        on_log = None if logs is None else (lambda step, nll, norm: logs.append((step, nll, norm)))
        epochs.append(train_epoch(model, windows, opt, options, log_every=2, on_log=on_log))
    return model, epochs


@pytest.mark.parametrize("variant", ["zaremba", "variational"])
def test_replayed_graphs_train_as_the_eager_step(variant, monkeypatch):
    """The same masks (the generator is restored after a capture), the same updates up to rounding
    (the graph's SGD is a multiply and a subtract), the same carried state, the lr change between
    epochs reaching the graph without a new capture; the short last window runs eagerly."""
    eager_logs, graph_logs = [], []
    eager, eager_epochs = _two_epochs(variant, eager_logs)
    assert graphs_status(eager) is None  # a CPU run never goes near a graph
    monkeypatch.setenv(graphs.GRAPHS_ENV, "emulate")
    graphed, graph_epochs = _two_epochs(variant, graph_logs)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), float((a - b).abs().max())
    for e, g in zip(eager_epochs, graph_epochs):
        assert g.nll == pytest.approx(e.nll, rel=1e-6) and g.norm_sum == pytest.approx(e.norm_sum, rel=1e-6)
        assert (g.steps, g.tokens, g.window) == (e.steps, e.tokens, e.window)
        for (eh, ec), (gh, gc) in zip(e.state, g.state):
            assert torch.allclose(eh, gh, atol=1e-6) and torch.allclose(ec, gc, atol=1e-6)
    assert [s for s, _, _ in graph_logs] == [s for s, _, _ in eager_logs] == [2, 4, 6, 8, 10, 2, 4, 6, 8, 10]
    for (_, e_nll, e_norm), (_, g_nll, g_norm) in zip(eager_logs, graph_logs):
        assert g_nll == pytest.approx(e_nll, rel=1e-6) and g_norm == pytest.approx(e_norm, rel=1e-6)
    # epoch 1: 3 warm-up steps, a capture, 5 more replays, the short window eagerly; epoch 2: 9 replays, 1 eager
    assert graphs_status(graphed) == {
        "backend": "emulated graph",
        "replayed_steps": 15,
        "eager_steps": 5,
        "captured_input_shapes": [[[BATCH, BPTT], [BATCH, BPTT], *[[1, BATCH, HIDDEN]] * 4]],
        "failure": None,
    }


def test_a_failed_capture_warns_once_and_trains_eagerly(monkeypatch, caplog):
    def refuse(self, fn, params):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    eager, _ = _two_epochs("zaremba")
    monkeypatch.setenv(graphs.GRAPHS_ENV, "emulate")
    monkeypatch.setattr(graphs.EmulatedBackend, "capture", refuse)
    with caplog.at_level("WARNING", logger="lm.graphs"):
        fallen, _ = _two_epochs("zaremba")
    for a, b in zip(eager.parameters(), fallen.parameters()):
        assert torch.equal(a, b)  # the eager step itself, bit for bit
    assert [r.getMessage() for r in caplog.records] == [
        "capturing the training step as a emulated graph failed (operation not permitted when stream is capturing); "
        "training runs the eager step"
    ]
    status = graphs_status(fallen)
    assert status["failure"] == "operation not permitted when stream is capturing"
    assert (status["replayed_steps"], status["eager_steps"], status["captured_input_shapes"]) == (0, 20, [])


def test_where_the_step_is_not_graphed_and_why(monkeypatch):
    model = LanguageModel(VOCAB, HIDDEN, 2, 0.0, 0.1)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    plain = StepOptions(max_grad_norm=5.0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert graphs_not_applicable(cpu, sgd, plain, None, False) == "not a GPU (cpu)"
    assert graphs_not_applicable(cuda, sgd, plain, None, False) is None
    assert "reads every step's loss" in graphs_not_applicable(cuda, sgd, StepOptions(5.0, skip_nonfinite=True), None, False)
    momentum = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    assert "plain SGD" in graphs_not_applicable(cuda, momentum, plain, None, False)
    assert "plain SGD" in graphs_not_applicable(cuda, torch.optim.Adam(model.parameters()), plain, None, False)
    assert graphs_not_applicable(cuda, sgd, StepOptions(5.0, cuda_graphs=False), None, False) == "turned off for this loop"
    monkeypatch.setenv(graphs.GRAPHS_ENV, "0")
    assert graphs_not_applicable(cuda, sgd, plain, None, False) == "turned off (LM_CUDA_GRAPHS=0)"


def test_metrics_record_how_the_step_ran(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    """A fallback must not be a warning line only: metrics.json says whether the step was replayed and why not."""
    cpu = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=6")), tmp_path / "cpu")
    assert cpu["step_paths"] == {"cuda_graphs": {"replayed_steps": 0, "not_used": "not a GPU (cpu)"}, "time_loop": None}
    monkeypatch.setenv(graphs.GRAPHS_ENV, "emulate")
    emulated = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=6")), tmp_path / "emulated")
    paths = emulated["step_paths"]["cuda_graphs"]
    assert (paths["replayed_steps"], paths["eager_steps"], paths["failure"]) == (3, 3, None)
    assert math.isfinite(emulated["valid_ppl"])
    assert emulated["valid_ppl"] == pytest.approx(cpu["valid_ppl"], rel=1e-4)
