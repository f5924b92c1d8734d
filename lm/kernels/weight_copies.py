"""bf16 copies of the weight matrices for bf16 training on CPU, rewritten by the SGD step.

Why: under autocast each step casts every weight matrix to bf16 for its products, and after
the backward casts the matrix's bf16 gradient back to fp32 for the optimizer: two passes over
all the weights, plus the fp32 gradient's own traffic (the clip norm and SGD read it). In the
large model that is about a tenth of a bf16 step on a 2-core CPU (``results/profile``).

Here the products read a bf16 copy of the matrix that is a leaf of the graph, so its gradient
stays bf16 (the values autocast's cast would have carried to fp32, unchanged), and one pass
(``lm.kernels``; two PyTorch ops, ``add_`` then ``copy_``, where the kernels are not built)
applies SGD to the fp32 weight from that gradient and rewrites the copy. The math is autocast's: the same products of
the same bf16 weights, the same gradients, the fp32 update as ``torch.optim.SGD`` computes it.
The fp32 weights stay the model: checkpoints, evaluation and fp32 code never see the copies.

A copy is valid while its weight is unchanged since it was written: a weight changed any other
way (a checkpoint load, Gal's weight shrink) has a new version number, and its copy is cast
again before its next product. Only single-process CPU training with plain SGD uses copies
(``applies``); elsewhere the products cast as autocast does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from lm import kernels

COPY_ATTR = "bf16_copy"  # the attribute of a weight that holds its _Copy


class _Copy:
    """A weight's bf16 copy (a leaf that collects the gradient) and the weight version it was written from."""

    def __init__(self, weight: torch.Tensor):
        self.tensor = weight.detach().to(torch.bfloat16).requires_grad_()
        self.version = weight._version

    def refresh(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.tensor.copy_(weight)
        self.version = weight._version


def product_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a product reads it in ``dtype``: its bf16 copy where it has one (cast again
    first if the weight changed since), else a cast (a no-op in the weight's own dtype)."""
    copy: _Copy | None = getattr(weight, COPY_ATTR, None)
    if copy is None or dtype != torch.bfloat16:
        return weight.to(dtype)
    if copy.version != weight._version:
        copy.refresh(weight)
    return copy.tensor


def fp32_norm(grad: torch.Tensor) -> torch.Tensor:
    """A gradient's L2 norm as an fp32 scalar, accumulated in fp32 or wider; a bf16 one is read once
    as it is (the kernel), not copied to fp32 first as ``vector_norm(..., dtype=float32)`` does."""
    if grad.dtype == torch.bfloat16 and grad.is_contiguous() and kernels.available(grad.device):
        return torch.tensor(kernels.fused().bf16_sum_squares(grad), dtype=torch.float64).sqrt().float()
    return torch.linalg.vector_norm(grad, dtype=torch.float32)


def product_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights that enter bf16 products as whole matrices: each layer's input and recurrent
    weights (a weight-dropped recurrent weight is computed anew each step: not that one) and the
    decoder's (not when tied to the embedding, whose lookup needs its fp32 gradient)."""
    weights = []
    for layer in model.layers:
        weights.append(layer.weight_ih_l0)
        if not parametrize.is_parametrized(layer, "weight_hh_l0"):  # (reading it would draw a mask)
            weights.append(layer.weight_hh_l0)
    if model.decoder.weight is not model.embedding.weight:
        weights.append(model.decoder.weight)
    return weights


def applies(model: nn.Module, optimizer: torch.optim.Optimizer, objective: nn.Module, autocast_dtype: torch.dtype | None) -> bool:
    """Whether a step keeps copies: bf16 on CPU, one process (a DistributedDataParallel objective
    averages the parameters' own gradients), plain SGD (what the update computes)."""
    device = next(model.parameters()).device
    plain_sgd = type(optimizer) is torch.optim.SGD and all(
        not g["momentum"] and not g["weight_decay"] and not g["maximize"] for g in optimizer.param_groups
    )
    return (
        autocast_dtype == torch.bfloat16
        and device.type == "cpu"
        and plain_sgd
        and not isinstance(objective, nn.parallel.DistributedDataParallel)
    )


class WeightCopies:
    """The copies of one model's product matrices while a training loop uses them: attached on
    entering (``with WeightCopies(model) as copies``), removed on leaving, so that no product
    outside the loop can route a gradient to a copy that no step would apply."""

    def __init__(self, model: nn.Module):
        self.weights = product_matrices(model)
        self.copies: dict[int, _Copy] = {}  # by id(weight)

    def __enter__(self) -> WeightCopies:
        for weight in self.weights:
            copy = _Copy(weight)
            setattr(weight, COPY_ATTR, copy)
            self.copies[id(weight)] = copy
        return self

    def __exit__(self, *exc) -> None:
        for weight in self.weights:
            if hasattr(weight, COPY_ATTR):
                delattr(weight, COPY_ATTR)
        self.copies.clear()

    def gradients(self, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
        """Each parameter's gradient, in order: its copy's (bf16) where its products read the copy."""
        grads = []
        for p in params:
            copy = self.copies.get(id(p))
            grads.append(copy.tensor.grad if copy is not None and copy.tensor.grad is not None else p.grad)
        return grads

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """SGD at each group's current lr for the weights with copies (``optimizer.step`` skips them:
        their own ``grad`` is None), each copy rewritten from its new weight."""
        fused = kernels.fused() if kernels.available("cpu") else None
        with torch.no_grad(), torch.profiler.record_function("WeightCopies.step"):  # a region make profile can name
            for group in optimizer.param_groups:
                for weight in group["params"]:
                    copy = self.copies.get(id(weight))
                    if copy is None or copy.tensor.grad is None:
                        continue
                    if copy.version != weight._version:
                        raise RuntimeError("a weight with a bf16 copy changed between its product and its update")
                    if fused is not None:
                        fused.sgd_bf16_copy(weight, copy.tensor.grad, copy.tensor, -group["lr"])
                    else:
                        weight.add_(copy.tensor.grad, alpha=-group["lr"])
                        copy.tensor.copy_(weight)
                    copy.version = weight._version

    def zero_grad(self) -> None:
        for copy in self.copies.values():
            copy.tensor.grad = None
