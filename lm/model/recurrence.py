"""One LSTM layer over a BPTT window as a single autograd Function (the training path).

Why not ``nn.LSTM`` for training on CPU: its oneDNN backward runs far below the
matrix-multiply ceiling, in bf16 above all, and it cannot mask h_{t-1}. Here the time
loop does only what must be sequential (one [batch, H] x [H, 4H] product and the gate
arithmetic per step); the input projection before it, and the input and recurrent
weight gradients after it, are one large product each over all steps, as cuDNN does.
The same loop carries the masks on h_{t-1} of the variational and recurrent dropout
variants, so every variant trains at the same speed.

Three implementations of the same equations: ``FusedLSTMWindow`` runs the compiled
kernel of ``lm.kernels`` (CPU; the gate arithmetic of a step is one pass);
``compiled_window`` is ``window_loop`` with its step compiled by ``torch.compile`` (GPU
training: inductor fuses each step's gate arithmetic, forward and backward, into a kernel
or two beside the product, where the eager loop launches some 25 kernels per step and
layer; one small graph serves every window length); and ``LSTMWindow`` is the pure-PyTorch
fallback (any device; a dozen ops per step), which GPU evaluation runs.

Mixed precision: products run in the compute dtype (bf16 under autocast); gate
pre-activations, the cell c and everything element-wise stay in fp32, so the carried
state is fp32. Gate order i, f, g, o as in ``nn.LSTM``, whose parameters this reads
(checkpoints are the same either way).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from lm import kernels
from lm.kernels.weight_copies import product_weight

log = logging.getLogger("lm.recurrence")

COMPILE_ENV = "LM_COMPILE"  # 0: never compile the window (GPU), the eager loop runs instead
RECOMPILE_LIMIT = 64  # graphs of the step kept per process (dynamo's default of 8 would silently run the rest eagerly)


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


def lstm_cell(
    x_t: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_t: torch.Tensor,
    h_mask: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step: x_t [B, 4H] fp32 (the step's input projection, biases included), h, c [B, H]
    fp32, w_t [H, 4H] (the recurrent weight, transposed, in ``compute_dtype``), h_mask None or
    [B, H]. Returns the new h and c. What ``torch.compile`` compiles: one small graph whatever the
    window's length."""
    h_in = h if h_mask is None else h * h_mask
    gates = x_t + torch.mm(h_in.to(compute_dtype), w_t).float()
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def window_loop(
    x_proj: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    h_mask: torch.Tensor | None,
    compute_dtype: torch.dtype,
    cell: Callable = lstm_cell,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``LSTMWindow``'s forward as plain differentiable ops (autograd derives the backward), one
    ``cell`` call per step: time-major x_proj [T, B, 4H] fp32, h0/c0 [B, H] fp32, products in
    ``compute_dtype``, everything else fp32. Returns outputs [T, B, H], h and c."""
    w_t = w_hh.to(compute_dtype).t()
    h, c = h0, c0
    outputs = []
    for t in range(x_proj.size(0)):
        h, c = cell(x_proj[t], h, c, w_t, None if h_mask is None else (h_mask if h_mask.dim() == 2 else h_mask[t]), compute_dtype)
        outputs.append(h)
    return torch.stack(outputs), h, c


def _signature(*tensors: torch.Tensor | None) -> tuple:
    """What a compiled graph is specialised on, per input: shape, dtype, whether it needs a gradient."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)


class CompiledWindow:
    """``window_loop`` with its step (``lstm_cell``) compiled: one small graph per step shape, mask
    kind, dtype and gradient pattern (a training run sees two: the first step, whose carried state
    needs no gradient, and the others), never one per window length, so a window of any length (the
    last, shorter window of an epoch) compiles nothing new.

    The first time a signature is met, its forward and backward are compiled on a copy of the step's
    inputs (AOTAutograd compiles the backward lazily, inside the training step's ``backward()``,
    where a failure could not be caught). Where compiling fails (no Triton, an unsupported GPU), one
    warning line, then ``None`` from every call: the caller runs the eager window instead, and
    ``status()`` (recorded in metrics.json) says so and why."""

    def __init__(self, compile_fn: Callable = torch.compile):
        self.reason: str | None = f"{COMPILE_ENV}=0" if os.environ.get(COMPILE_ENV, "1") == "0" else None
        self.failed = self.reason is not None
        if not self.failed:  # a process may train several shapes (the bench: 3 sizes, 2 dtypes, 2 gradient patterns)
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        self._cell = None if self.failed else compile_fn(lstm_cell, fullgraph=True, dynamic=False)
        self._ready: set[tuple] = set()  # signatures whose forward and backward compiled
        self.windows = 0  # windows run compiled

    def __call__(self, x_proj, h0, c0, w_hh, h_mask, compute_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.failed:
            return None
        try:
            # contiguous: a step of a transposed batch-first projection has a stride that grows with the
            # window's length, and a graph is specialised on strides
            result = window_loop(x_proj.contiguous(), h0, c0, w_hh, h_mask, compute_dtype, cell=self._checked_cell)
        except Exception as err:  # a compiler or backend failure; the same math runs eagerly
            self.failed = True
            self.reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            log.warning("compiling the LSTM window failed (%s); training runs the slower eager loop", self.reason)
            return None
        self.windows += 1
        return result

    def _checked_cell(self, x_t, h, c, w_t, h_mask, compute_dtype):
        key = (_signature(x_t, h, c, w_t, h_mask), compute_dtype, torch.is_grad_enabled())
        if key not in self._ready:
            self._compile_both_ways(x_t, h, c, w_t, h_mask, compute_dtype)
            self._ready.add(key)
        return self._cell(x_t, h, c, w_t, h_mask, compute_dtype)

    def _compile_both_ways(self, x_t, h, c, w_t, h_mask, compute_dtype) -> None:
        """The compiled step once on detached copies of its inputs, and its gradient, so that both
        graphs exist (or fail here) before a training step relies on them."""
        copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x_t, h, c)]
        w_leaf = w_t.detach().t().clone().requires_grad_(w_t.requires_grad)
        inputs = [*copies, w_leaf.t()]  # a transposed view, as window_loop passes it
        mask = None if h_mask is None else h_mask.detach()
        h_new, c_new = self._cell(*inputs, mask, compute_dtype)
        wanted = [t for t in (*copies, w_leaf) if t.requires_grad]
        if wanted and torch.is_grad_enabled():
            torch.autograd.grad(h_new.sum() + c_new.sum(), wanted)

    def status(self) -> dict[str, str | int | None]:
        """How the GPU's masked or bf16 layers ran their time loop, for metrics.json."""
        return {
            "path": "eager loop" if self.failed else "compiled step (torch.compile)",
            "fallback_reason": self.reason,
            "compiled_signatures": len(self._ready),
            "windows_compiled": self.windows,
        }


@functools.cache
def compiled_window() -> CompiledWindow:
    """The process's compiled window (compiled graphs are cached per process anyway)."""
    return CompiledWindow()


def window_path(device: torch.device) -> str:
    """Which implementation runs a window on ``device`` now: ``fused`` (the CPU kernels),
    ``compiled`` (a GPU, training: gradients wanted) or ``eager`` (the pure-PyTorch loop: any
    other device, and evaluation on a GPU, whose Monte Carlo dropout windows of 500 steps and
    odd-length last ones would each be worth no compile)."""
    if kernels.available(device):
        return "fused"
    if device.type == "cuda" and torch.is_grad_enabled():
        return "compiled"
    return "eager"


def lstm_window(
    layer: torch.nn.LSTM,
    x: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    h_mask: torch.Tensor | None = None,
    w_hh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Run a single-layer batch-first ``nn.LSTM``'s parameters over x [B, T, H_in].

    Same call and result shapes as ``layer(x, state)``; ``w_hh`` replaces the
    recurrent weight (a weight-dropped one), ``h_mask`` masks h_{t-1}.
    Under autocast the products run in the autocast dtype. The compiled kernel
    runs where ``lm.kernels`` has one for the device (CPU), ``torch.compile``'s step on a GPU
    when gradients are wanted (training), the eager loop elsewhere: evaluation with dropout on
    (Monte Carlo dropout, its windows of 500 steps and their odd-length last ones) compiles nothing.
    """
    device = x.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    w_hh = layer.weight_hh_l0 if w_hh is None else w_hh
    w_ih = product_weight(layer.weight_ih_l0, compute_dtype)  # its bf16 copy during bf16 training on CPU
    x_proj = torch.nn.functional.linear(x, w_ih, layer.bias_ih_l0 + layer.bias_hh_l0)
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
            result = compiled_window()(x_proj, h0, c0, w_hh, None if h_mask is None else h_mask.float(), compute_dtype)
    if result is None:
        result = LSTMWindow.apply(x_proj, h0, c0, product_weight(w_hh, compute_dtype), h_mask, compute_dtype)
    out, h, c = result
    return out.transpose(0, 1), (h.unsqueeze(0), c.unsqueeze(0))
