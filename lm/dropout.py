"""Dropout strategies for recurrent language models, as small functions the model composes.

- ``zaremba``: a fresh mask for every element at every time step, on the L+1
  non-recurrent connections only (``nn.Dropout``).
- ``variational`` (Gal & Ghahramani 2016): one mask per sequence and batch row,
  shared over all time steps (``locked_mask``), on layer inputs, the top output
  and the recurrent h; plus word-level embedding dropout (``word_mask``).
- ``recurrent``: the zaremba places plus a fresh mask on h_{t-1} at every step,
  the placement the paper warns against.
- ``none``.

Weight dropping (DropConnect on the hidden-to-hidden matrix) is ``WeightDrop``,
a ``torch.nn.utils.parametrize`` parametrization: no patching of ``nn.LSTM``.
All masks are inverted (scaled by 1/(1-p) at training time).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

VARIANTS = ("zaremba", "variational", "recurrent", "none")


def locked_mask(batch: int, features: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """A [batch, 1, features] mask, broadcast over time: the same units dropped at every step."""
    keep = 1.0 - p
    return torch.empty(batch, 1, features, dtype=like.dtype, device=like.device).bernoulli_(keep) / keep


def word_mask(ids: torch.Tensor, vocab_size: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """[batch, time, 1] scale that drops whole word types within each row's sequence.

    Every occurrence of a dropped word in a row is zeroed, as if its embedding
    row were removed for that sequence (Gal & Ghahramani's embedding dropout).
    """
    keep = 1.0 - p
    per_type = torch.empty(ids.size(0), vocab_size, dtype=dtype, device=ids.device).bernoulli_(keep) / keep
    return per_type.gather(1, ids).unsqueeze(-1)


class WeightDrop(nn.Module):
    """DropConnect on a weight matrix: a fresh mask over its entries at every forward in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(weight, self.p, self.training)


def lstm_recurrence(
    x_proj: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_hh: torch.Tensor,
    h_mask: Optional[torch.Tensor],
    fresh_p: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer's time loop with a mask on h_{t-1} (the cell c is never masked).

    x_proj: [batch, time, 4H] input projections with both biases (computed for all
    steps at once); h, c: [batch, H]; h_mask: a [batch, H] mask shared by all steps
    (variational) or None; fresh_p: rate of a fresh mask per step (recurrent).
    Gate order i, f, g, o as in ``nn.LSTM``.
    """
    outputs = []
    w_t = w_hh.t()
    for t in range(x_proj.size(1)):
        h_in = h
        if h_mask is not None:
            h_in = h * h_mask
        elif training and fresh_p > 0.0:
            h_in = nn.functional.dropout(h, fresh_p, True)
        gates = torch.addmm(x_proj[:, t], h_in, w_t)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs, 1), h, c


def _scripted(fn):
    """TorchScript the loop (removes Python overhead per step); eager if scripting is unavailable."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - scripting is an optimization only
        return fn


lstm_recurrence_scripted = _scripted(lstm_recurrence)
