"""The training time loop (lm.recurrence) computes nn.LSTM's function and gradients."""

from __future__ import annotations

import pytest
import torch

from lm.recurrence import lstm_window

from helpers import reference_lstm

B, T, H = 3, 7, 5


def _run(fn, layer, x, state):
    """Outputs, final state and the gradient of every input and parameter for a fixed loss."""
    for p in [x, *state, *layer.parameters()]:
        p.grad = None
    out, (h, c) = fn()
    (out.sin().sum() + h.cos().sum() + 0.3 * c.sum()).backward()
    return [out.detach(), h.detach(), c.detach()] + [p.grad.clone() for p in [x, *state, *layer.parameters()]]


@pytest.fixture
def problem():
    torch.manual_seed(0)
    layer = torch.nn.LSTM(H, H, batch_first=True)
    x = torch.randn(B, T, H, requires_grad=True)
    state = (torch.randn(1, B, H, requires_grad=True), torch.randn(1, B, H, requires_grad=True))
    return layer, x, state


def test_matches_nn_lstm_values_and_gradients(problem):
    layer, x, state = problem
    expected = _run(lambda: layer(x, state), layer, x, state)
    got = _run(lambda: lstm_window(layer, x, state), layer, x, state)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-5)


def test_bf16_autocast_is_close_and_keeps_fp32_state(problem):
    layer, x, state = problem
    expected = _run(lambda: layer(x, state), layer, x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(lambda: lstm_window(layer, x, state), layer, x, state)
    assert [t.dtype for t in got[:3]] == [torch.float32] * 3
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=0.05, rtol=0.05)
    assert not torch.equal(expected[0], got[0])  # the products really ran in bf16


@pytest.mark.parametrize("per_step", [False, True], ids=["shared mask", "mask per step"])
def test_mask_on_h_matches_the_step_by_step_equations(problem, per_step):
    layer, x, state = problem
    shape = (T, B, H) if per_step else (B, H)
    mask = (torch.rand(shape) > 0.5).float() * 2

    masks = mask if per_step else [mask] * T
    expected = _run(lambda: reference_lstm(layer, x, state, masks), layer, x, state)
    got = _run(lambda: lstm_window(layer, x, state, h_mask=mask), layer, x, state)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-5)
