"""The GRU cell: ``nn.GRU``'s parameters (gate order r, z, n) and its own time loop.

    r = sigmoid(x_r + W_hr h_in + b_hr)    z = sigmoid(x_z + W_hz h_in + b_hz)
    n = tanh(x_n + r * (W_hn h_in + b_hn))  h_t = (1 - z) * n + z * h_{t-1}

with x_* = W_i* x + b_i* and h_in = h_{t-1} * mask. Where the recurrent dropout mask goes: on
h_{t-1} where it enters the recurrent products, that is before the reset gate multiplies W_hn h_in
(Gal & Ghahramani's GRU, as in their code and Keras's), not on the carried h_{t-1} of the
interpolation z * h_{t-1}. A mask there would zero the memory the update gate keeps (z near 1
copies h_{t-1}); in the products it drops what the units read from the past, as the LSTM's mask on
h_{t-1} does. ``tests/test_cells.py`` holds the code to this.

Bias folding: b_hr and b_hz add outside every product, so they join the input projection; b_hn does
not (the reset gate multiplies it), so every step adds it inside the reset product.

Three implementations: ``FusedGRUWindow`` (the CPU kernel of ``lm.kernels``), ``gru_step`` compiled
by ``torch.compile`` (GPU training) and the same step as plain PyTorch ops (any device; autograd
derives its backward). Products in the compute dtype, gates and state in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from lm.kernels.weight_copies import product_weight
from lm.model.cells.base import RecurrentCell
from lm.model.cells.gru_kernel import FusedGRUWindow
from lm.model.cells.loop import compute_dtype_of, window_loop, window_path
from lm.model.cells.state import LayerState


def gru_step(
    x_t: torch.Tensor,
    state: tuple[torch.Tensor],
    params: tuple[torch.Tensor, torch.Tensor],
    h_mask: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor]:
    """One time step: x_t [B, 3H] fp32 (input projection with b_ir + b_hr and b_iz + b_hz, b_in), state
    (h,) [B, H] fp32, params (w_t, b_hn): the recurrent weight [H, 3H] transposed in ``compute_dtype``
    and b_hn [H] fp32; h_mask None or [B, H]. Returns (h_t,)."""
    (h,) = state
    w_t, b_hn = params
    h_in = h if h_mask is None else h * h_mask
    hidden_r, hidden_z, hidden_n = torch.mm(h_in.to(compute_dtype), w_t).float().chunk(3, 1)
    x_r, x_z, x_n = x_t.chunk(3, 1)
    r = torch.sigmoid(x_r + hidden_r)
    z = torch.sigmoid(x_z + hidden_z)
    n = torch.tanh(x_n + r * (hidden_n + b_hn))
    return (n + z * (h - n),)


class GRULayer(RecurrentCell, nn.GRU):
    """A single-layer batch-first ``nn.GRU``; state (h,)."""

    name = "gru"
    gates = 3
    state_names = ("h",)
    step = staticmethod(gru_step)

    def __init__(self, input_size: int, hidden_size: int):
        nn.GRU.__init__(self, input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:  # type: ignore[override]
        """``nn.GRU``'s, with the state as a tuple like every cell's."""
        out, h = nn.GRU.forward(self, x, state[0])
        return out, (h,)

    def window(
        self, x: torch.Tensor, state: LayerState, h_mask: torch.Tensor | None = None, w_hh: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerState]:
        """The CPU kernel where ``lm.kernels`` has one, ``torch.compile``'s step on a GPU in training,
        the eager loop elsewhere (as the LSTM's)."""
        device = x.device.type
        compute_dtype = compute_dtype_of(device)
        hidden = self.hidden_size
        w_hh = self.weight_hh_l0 if w_hh is None else w_hh
        b_hh = self.bias_hh_l0
        x_bias = self.bias_ih_l0 + torch.cat([b_hh[: 2 * hidden], torch.zeros_like(b_hh[2 * hidden :])])
        x_proj = torch.nn.functional.linear(x, product_weight(self.weight_ih_l0, compute_dtype), x_bias)
        h0 = state[0][0].float().contiguous()
        b_hn = b_hh[2 * hidden :].float()
        mask = None if h_mask is None else h_mask.float().contiguous()
        path = window_path(x.device)
        with torch.autocast(device, enabled=False):
            if path == "fused":
                w = product_weight(w_hh, compute_dtype)
                out, h = FusedGRUWindow.apply(x_proj.to(compute_dtype).contiguous(), h0, w, b_hn, mask)
                return out, (h.unsqueeze(0),)
            x_proj = x_proj.transpose(0, 1).float()
            result = None
            if path == "compiled":
                result = self.compiled_window()(x_proj, (h0,), (w_hh.to(compute_dtype).t(), b_hn), mask, compute_dtype)
            if result is None:
                params = (product_weight(w_hh, compute_dtype).t(), b_hn)
                result = window_loop(gru_step, x_proj, (h0,), params, mask, compute_dtype)
        out, (h,) = result
        return out.transpose(0, 1), (h.unsqueeze(0),)
