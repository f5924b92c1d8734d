"""The LSTM cell: ``nn.LSTM``'s parameters (gate order i, f, g, o) and its own time loop.

Why its own loop for training on CPU: ``nn.LSTM``'s oneDNN backward runs far below the
matrix-multiply ceiling, in bf16 above all, and it cannot mask h_{t-1}. Here the time
loop does only what must be sequential (one [batch, H] x [H, 4H] product and the gate
arithmetic per step); the input projection before it, and the input and recurrent
weight gradients after it, are one large product each over all steps, as cuDNN does.
The same loop carries the masks on h_{t-1} of the variational and recurrent dropout
variants, so every variant trains at the same speed.

Three implementations of the same equations: ``FusedLSTMWindow`` runs the compiled
kernel of ``lm.kernels`` (CPU; the gate arithmetic of a step is one pass); the compiled
window is ``lstm_step`` compiled by ``torch.compile`` (GPU training: inductor fuses each
step's gate arithmetic, forward and backward, into a kernel or two beside the product, where
the eager loop launches some 25 kernels per step and layer; ``lm.model.cells.loop``); and
``LSTMWindow`` is the pure-PyTorch fallback (any device; a dozen ops per step), which GPU
evaluation runs.

Mixed precision: products run in the compute dtype (bf16 under autocast); gate
pre-activations, the cell c and everything element-wise stay in fp32, so the carried
state is fp32. Both biases fold into the input projection (the LSTM adds them outside
every product).
"""

from __future__ import annotations

import torch
from torch import nn

from lm import kernels
from lm.kernels.weight_copies import product_weight
from lm.model.cells.base import RecurrentCell
from lm.model.cells.loop import compute_dtype_of, window_path
from lm.model.cells.state import LayerState


class LSTMWindow(torch.autograd.Function):
    """The pure-PyTorch window. Time-major: x_proj [T, B, 4H] (both biases included), h0/c0 [B, H], w_hh [4H, H];
    h_mask None, [B, H] (shared by every step) or [T, B, H] (one per step), already scaled."""

    @staticmethod
    def forward(ctx, x_proj, h0, c0, w_hh, h_mask, compute_dtype):
        with torch.autocast(x_proj.device.type, enabled=False):
            steps, batch, four_h = x_proj.shape
            hidden = four_h // 4
            w = w_hh.to(compute_dtype)
            w_t = w.t()
            acts = torch.empty(steps, batch, four_h, dtype=torch.float32, device=x_proj.device)
            cells = torch.empty(steps + 1, batch, hidden, dtype=torch.float32, device=x_proj.device)
            tanh_c = torch.empty(steps, batch, hidden, dtype=torch.float32, device=x_proj.device)
            outputs = torch.empty(steps, batch, hidden, dtype=torch.float32, device=x_proj.device)
            h_in = torch.empty(steps, batch, hidden, dtype=compute_dtype, device=x_proj.device)
            x_proj = x_proj.float().contiguous()
            h, c = h0.float(), c0.float()
            cells[0] = c
            for t in range(steps):
                masked = h if h_mask is None else h * (h_mask if h_mask.dim() == 2 else h_mask[t])
                h_in[t] = masked
                if compute_dtype == torch.float32:
                    gates = torch.addmm(x_proj[t], h_in[t], w_t)
                else:
                    gates = x_proj[t] + torch.mm(h_in[t], w_t)
                a = acts[t]
                torch.sigmoid(gates, out=a)
                torch.tanh(gates[:, 2 * hidden : 3 * hidden], out=a[:, 2 * hidden : 3 * hidden])
                i, f, g, o = a.chunk(4, 1)
                c = torch.addcmul(f * c, i, g, out=cells[t + 1])
                torch.tanh(c, out=tanh_c[t])
                h = torch.mul(o, tanh_c[t], out=outputs[t])
            ctx.save_for_backward(acts, cells, tanh_c, h_in, w, h_mask)
            ctx.w_dtype = w_hh.dtype
            return outputs, h.clone(), c

    @staticmethod
    def backward(ctx, d_out, d_h, d_c):
        acts, cells, tanh_c, h_in, w, h_mask = ctx.saved_tensors
        with torch.autocast(acts.device.type, enabled=False):
            steps, batch, four_h = acts.shape
            hidden = four_h // 4
            d_gates = torch.empty_like(acts)
            dh = torch.zeros_like(cells[0]) if d_h is None else d_h.float()
            dc = torch.zeros_like(cells[0]) if d_c is None else d_c.float()
            for t in range(steps - 1, -1, -1):
                i, f, g, o = acts[t].chunk(4, 1)
                dg_i, dg_f, dg_g, dg_o = d_gates[t].chunk(4, 1)
                dh_t = dh if d_out is None else dh + d_out[t]
                tc = tanh_c[t]
                torch.mul(dh_t * tc, o * (1 - o), out=dg_o)
                dc = dc + dh_t * o * (1 - tc * tc)
                torch.mul(dc * g, i * (1 - i), out=dg_i)
                torch.mul(dc * cells[t], f * (1 - f), out=dg_f)
                torch.mul(dc * i, 1 - g * g, out=dg_g)
                dc = dc * f
                dh = torch.mm(d_gates[t].to(w.dtype), w).float()
                if h_mask is not None:
                    dh = dh * (h_mask if h_mask.dim() == 2 else h_mask[t])
            flat = d_gates.view(steps * batch, four_h)
            d_w = torch.mm(flat.to(w.dtype).t(), h_in.view(steps * batch, hidden)).to(ctx.w_dtype)
            return d_gates, dh, dc, d_w, None, None


class FusedLSTMWindow(torch.autograd.Function):
    """The compiled window (CPU). Batch-first: x_proj [B, T, 4H] in the compute dtype (both
    biases included), h0/c0 [B, H] fp32, w_hh [4H, H] in the compute dtype, h_mask None,
    [B, H] or [T, B, H] fp32 (already scaled). Outputs [B, T, H] and the final h, c in fp32."""

    @staticmethod
    def forward(ctx, x_proj, h0, c0, w_hh, h_mask):
        out, h, c, acts, cells, tanh_c, h_in = kernels.fused().lstm_forward(x_proj, h0, c0, w_hh, h_mask)
        ctx.save_for_backward(acts, cells, tanh_c, h_in, w_hh, h_mask)
        return out, h, c

    @staticmethod
    def backward(ctx, d_out, d_h, d_c):
        acts, cells, tanh_c, h_in, w_hh, h_mask = ctx.saved_tensors
        batch, hidden = cells.size(1), cells.size(2)
        zeros = lambda: torch.zeros(batch, hidden)  # noqa: E731  (a final state the loss never saw)
        d_out = torch.zeros(batch, acts.size(0), hidden) if d_out is None else d_out
        d_x, d_h0, d_c0, d_w = kernels.fused().lstm_backward(
            d_out, zeros() if d_h is None else d_h, zeros() if d_c is None else d_c, acts, cells, tanh_c, h_in, w_hh, h_mask
        )
        return d_x, d_h0, d_c0, d_w, None


def lstm_step(
    x_t: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    params: tuple[torch.Tensor],
    h_mask: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step: x_t [B, 4H] fp32 (the step's input projection, biases included), state (h, c)
    [B, H] fp32, params (w_t,): the recurrent weight [H, 4H], transposed, in ``compute_dtype``;
    h_mask None or [B, H]. Returns the new (h, c). What ``torch.compile`` compiles: one small graph
    whatever the window's length."""
    h, c = state
    (w_t,) = params
    h_in = h if h_mask is None else h * h_mask
    gates = x_t + torch.mm(h_in.to(compute_dtype), w_t).float()
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class LSTMLayer(RecurrentCell, nn.LSTM):
    """A single-layer batch-first ``nn.LSTM``; state (h, c)."""

    name = "lstm"
    gates = 4
    state_names = ("h", "c")
    step = staticmethod(lstm_step)

    def __init__(self, input_size: int, hidden_size: int):
        nn.LSTM.__init__(self, input_size, hidden_size, batch_first=True)

    def window(
        self, x: torch.Tensor, state: LayerState, h_mask: torch.Tensor | None = None, w_hh: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerState]:
        """The compiled kernel runs where ``lm.kernels`` has one for the device (CPU), ``torch.compile``'s
        step on a GPU when gradients are wanted (training), the eager loop elsewhere: evaluation with
        dropout on (Monte Carlo dropout, its windows of 500 steps and their odd-length last ones)
        compiles nothing."""
        device = x.device.type
        compute_dtype = compute_dtype_of(device)
        w_hh = self.weight_hh_l0 if w_hh is None else w_hh
        w_ih = product_weight(self.weight_ih_l0, compute_dtype)  # its bf16 copy during bf16 training on CPU
        x_proj = torch.nn.functional.linear(x, w_ih, self.bias_ih_l0 + self.bias_hh_l0)
        h0, c0 = state[0][0].float().contiguous(), state[1][0].float().contiguous()
        path = window_path(x.device)
        if path == "fused":
            with torch.autocast(device, enabled=False):
                mask = None if h_mask is None else h_mask.float().contiguous()
                w = product_weight(w_hh, compute_dtype)
                out, h, c = FusedLSTMWindow.apply(x_proj.to(compute_dtype).contiguous(), h0, c0, w, mask)
            return out, (h.unsqueeze(0), c.unsqueeze(0))
        x_proj = x_proj.transpose(0, 1).float()
        result = None
        if path == "compiled":
            with torch.autocast(device, enabled=False):
                mask = None if h_mask is None else h_mask.float()
                compiled = self.compiled_window()(x_proj, (h0, c0), (w_hh.to(compute_dtype).t(),), mask, compute_dtype)
            if compiled is not None:
                out, (h, c) = compiled
                result = out, h, c
        if result is None:
            result = LSTMWindow.apply(x_proj, h0, c0, product_weight(w_hh, compute_dtype), h_mask, compute_dtype)
        out, h, c = result
        return out.transpose(0, 1), (h.unsqueeze(0), c.unsqueeze(0))
