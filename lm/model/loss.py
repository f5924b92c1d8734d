"""The training loss: the decoder and the cross-entropy summed over every token of a window.

The paper's loss is this sum divided by the batch size (the trainer divides). On CPU
the decoder product and the loss are one fused step (``lm.kernels``): the logits are
written once, and turned in place into their gradient, so the backward is just the two
products; elsewhere it is ``nn.Linear`` + ``F.cross_entropy`` in fp32, the same math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm import kernels
from lm.kernels.weight_copies import product_weight


class FusedLinearNLL(torch.autograd.Function):
    """sum_rows(logsumexp(h W^T + b) - (h W^T + b)[y]) with h [N, K], W [V, K] in the product dtype."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets):
        loss, d_logits = kernels.fused().linear_nll_forward(h, weight, bias, targets)
        ctx.save_for_backward(h, weight, d_logits)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, weight, d_logits = ctx.saved_tensors
        scale = float(grad)  # CPU only, so reading the scalar costs no device sync
        d_h = torch.addmm(h, d_logits, weight, beta=0, alpha=scale)
        d_w = torch.addmm(weight, d_logits.t(), h, beta=0, alpha=scale)
        d_b = d_logits.sum(0, dtype=torch.float32).mul_(scale)
        return d_h, d_w, d_b, None


def summed_nll(decoder: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``decoder(hidden)`` against ``targets``, summed over all tokens (fp32 scalar).

    hidden [..., K], targets [...]; under autocast the products run in its dtype and the
    softmax in fp32, as in the unfused path.
    """
    flat, y = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    if not kernels.available(hidden.device):
        logits = F.linear(flat, product_weight(decoder.weight, dtype), decoder.bias)
        return F.cross_entropy(logits.float(), y, reduction="sum")
    with torch.autocast(device, enabled=False):
        return FusedLinearNLL.apply(flat.to(dtype), product_weight(decoder.weight, dtype), decoder.bias, y)


class WindowLoss(nn.Module):
    """The training objective of one window: the model's features, then the decoder and the
    summed NLL of the targets. A module of its own so that ``DistributedDataParallel`` can
    wrap exactly what a training step runs (the model's ``forward`` returns logits instead)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        hidden, state = self.model.features(x, state)
        return summed_nll(self.model.decoder, hidden, y), state
