"""One GRU layer over a BPTT window on the compiled CPU kernel (``gru_forward``/``gru_backward``
in ``lm/kernels/csrc/fused.cpp``), as an autograd Function.

Why a kernel: as for the LSTM (``lm.model.cells.lstm``), a step is one [B, H] x [H, 3H] product
and a dozen small element-wise ops that PyTorch would launch one by one; the kernel does the
element-wise part in one pass per step, forward and backward, and the weight gradient is one
product over all steps.

Equations (``nn.GRU``'s, gate order r, z, n), with h_in = h_{t-1} * mask_t (the recurrent dropout
mask, if any, only where h_{t-1} enters the products):
    r = sigmoid(x_r + W_hr h_in), z = sigmoid(x_z + W_hz h_in), n = tanh(x_n + r * (W_hn h_in + b_hn)),
    h_t = (1 - z) * n + z * h_{t-1}   (the unmasked h_{t-1}).
x_proj = W_ih x + b_ih + [b_hr, b_hz, 0]: the caller folds the r and z hidden biases into the input
projection; b_hn sits inside the reset product, so it is an input of its own.
"""

from __future__ import annotations

import torch

from lm import kernels


class FusedGRUWindow(torch.autograd.Function):
    """The compiled GRU window (CPU). Batch-first: x_proj [B, T, 3H] in the compute dtype (fp32 or
    bf16, contiguous), h0 [B, H] fp32, w_hh [3H, H] in the compute dtype, b_hn [H] fp32, h_mask None,
    [B, H] (every step) or [T, B, H] (one per step) fp32, already scaled. Returns the outputs
    [B, T, H] and the final h [B, H], both fp32; gradients for x_proj, h0, w_hh and b_hn."""

    @staticmethod
    def forward(ctx, x_proj, h0, w_hh, b_hn, h_mask):
        out, h, acts, gh_n, h_in = kernels.fused().gru_forward(x_proj, h0, w_hh, b_hn, h_mask)
        ctx.set_materialize_grads(False)  # an output the loss never saw comes as None, not a tensor of zeros
        # out is saved too: it holds h_{t-1} of every step but the first, which the backward needs
        ctx.save_for_backward(acts, gh_n, h_in, out, h0, w_hh, h_mask)
        return out, h

    @staticmethod
    def backward(ctx, d_out, d_h):
        acts, gh_n, h_in, out, h0, w_hh, h_mask = ctx.saved_tensors
        if d_h is None:  # the final state reached no loss
            d_h = torch.zeros_like(h0)
        # d_out None (the outputs reached no loss) goes to the kernel as None: no gradient to add
        d_x, d_h0, d_w, d_b_hn = kernels.fused().gru_backward(d_out, d_h, acts, gh_n, h_in, out, h0, w_hh, h_mask)
        return d_x, d_h0, d_w, d_b_hn, None
