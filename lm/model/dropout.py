"""Dropout strategies for recurrent language models, as small functions the model composes.

- ``zaremba``: a fresh mask for every element at every time step, on the L+1
  non-recurrent connections only (``FreshDropout``: ``nn.Dropout``'s function, its
  mask drawn by a fused kernel on CPU).
- ``variational`` (Gal & Ghahramani 2016): one mask per sequence and batch row,
  shared over all time steps (``locked_mask``), on layer inputs, the top output
  and the recurrent h; plus word-level embedding dropout (``word_mask``).
- ``recurrent``: the zaremba places plus a fresh mask on h_{t-1} at every step,
  the placement the paper warns against.
- ``none``.

The model draws the masks on h_{t-1}; the cell (``lm.model.cells``) applies them inside its
layer's time loop (oneDNN's and cuDNN's layers cannot take them).
Weight dropping (DropConnect on the hidden-to-hidden matrix) is ``WeightDrop``,
a ``torch.nn.utils.parametrize`` parametrization: no patching of ``nn.LSTM`` or ``nn.GRU``.
All masks are inverted (scaled by 1/(1-p) at training time).

Data parallelism (``BatchShare``): every process draws each mask for the global batch, with
the same generator in the same state, and keeps its own rows. So processes drop different
units, their generators never drift apart (one saved RNG state resumes any number of them),
and N processes train exactly as one process on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm import kernels


def keep_draws(like: torch.Tensor, keep: float) -> torch.Tensor:
    """1 with probability ``keep``, else 0, shaped and laid out like ``like``: the draws of
    ``torch.empty_like(like).bernoulli_(keep)``.

    On CPU, float64 uniforms compared with ``keep`` consume the generator exactly as
    ``bernoulli_`` does, element by element in memory order (hence the same layout as
    ``like``, which may be a transposed view), and give the same mask bit for bit in about
    60% of the time (a test holds it to that). On GPU ``bernoulli_`` is already fast.
    """
    if like.device.type == "cpu":
        return (torch.empty_like(like, dtype=torch.float64).uniform_() < keep).to(like.dtype)
    return torch.empty_like(like).bernoulli_(keep)


@dataclass(frozen=True)
class BatchShare:
    """The rows of the global batch this process trains on (``first_row`` of ``global_rows``);
    the default, ``global_rows`` None, is a process that holds the whole batch."""

    first_row: int = 0
    global_rows: int | None = None

    @property
    def partial(self) -> bool:
        return self.global_rows is not None

    def rows_of(self, mask: torch.Tensor, batch_dim: int, rows: int) -> torch.Tensor:
        """This process's ``rows`` of a mask drawn for the global batch."""
        return mask.narrow(batch_dim, self.first_row, rows) if self.partial else mask

    def global_shape(self, shape: tuple[int, ...], batch_dim: int) -> tuple[int, ...]:
        if not self.partial:
            return tuple(shape)
        return tuple(self.global_rows if d == batch_dim else n for d, n in enumerate(shape))


WHOLE_BATCH = BatchShare()


def inverted_mask(
    shape: tuple[int, ...],
    p: float,
    dtype: torch.dtype,
    device: torch.device,
    share: BatchShare = WHOLE_BATCH,
    batch_dim: int = 0,
) -> torch.Tensor:
    """Zeros with probability p, 1/(1-p) elsewhere: every mask of every strategy. Drawn for the
    global batch and cut to this process's rows along ``batch_dim`` (see ``BatchShare``)."""
    keep = 1.0 - p
    full = keep_draws(torch.empty(share.global_shape(shape, batch_dim), dtype=dtype, device=device), keep) / keep
    return share.rows_of(full, batch_dim, shape[batch_dim])


class HashDropout(torch.autograd.Function):
    """x * mask / keep on CPU (``lm.kernels``), the mask a hash of (seed, element index): one pass,
    and the backward draws the same mask again from the seed instead of storing it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: float, seed: int, offset: int) -> torch.Tensor:
        ctx.keep, ctx.seed, ctx.offset = keep, seed, offset
        return kernels.fused().dropout_forward(x, keep, seed, offset)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return kernels.fused().dropout_forward(grad.contiguous(), ctx.keep, ctx.seed, ctx.offset), None, None, None


class FreshDropout(nn.Dropout):
    """``nn.Dropout`` (a fresh mask for every element at every call).

    On CPU with the fused kernels the mask comes from ``HashDropout``, seeded by one draw of
    torch's generator per call (so ``torch.manual_seed`` and a checkpoint's RNG state fix
    every mask); elsewhere it is ``nn.Dropout``'s (GPU) or the same draws faster (CPU fallback).
    Under data parallelism (``share``) the mask is the global batch's, cut to this process's rows.
    """

    def __init__(self, p: float = 0.5, share: BatchShare = WHOLE_BATCH):
        super().__init__(p)
        self.share = share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0, 1) or self.inplace:
            return super().forward(x)
        keep = 1.0 - self.p
        if x.device.type == "cpu" and x.dtype == torch.float32 and kernels.available(x.device):
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            offset = self.share.first_row * (x.numel() // max(x.size(0), 1))  # the global index of this process's first element
            return HashDropout.apply(x.contiguous(), keep, seed, offset)
        if x.device.type != "cpu" and not self.share.partial:
            return super().forward(x)
        # drawn in [batch, ...] order whatever x's memory layout, so row shares cut the same draws
        return x * inverted_mask(tuple(x.shape), self.p, x.dtype, x.device, self.share)


def locked_mask(batch: int, features: int, p: float, like: torch.Tensor, share: BatchShare = WHOLE_BATCH) -> torch.Tensor:
    """A [batch, 1, features] mask, broadcast over time: the same units dropped at every step."""
    return inverted_mask((batch, 1, features), p, like.dtype, like.device, share)


def word_mask(ids: torch.Tensor, vocab_size: int, p: float, dtype: torch.dtype, share: BatchShare = WHOLE_BATCH) -> torch.Tensor:
    """[batch, time, 1] scale that drops whole word types within each row's sequence.

    Every occurrence of a dropped word in a row is zeroed, as if its embedding
    row were removed for that sequence (Gal & Ghahramani's embedding dropout).
    """
    per_type = inverted_mask((ids.size(0), vocab_size), p, dtype, ids.device, share)
    return per_type.gather(1, ids).unsqueeze(-1)


class WeightDrop(nn.Module):
    """DropConnect on a weight matrix: a fresh mask over its entries at every forward in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(weight, self.p, self.training)
