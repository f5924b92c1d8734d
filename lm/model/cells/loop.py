"""What every cell's time loop shares: the plain loop over a window, its step compiled for a GPU,
and the choice of implementation per device.

A cell gives a *step*: ``step(x_t, state, params, h_mask, compute_dtype) -> state``, with x_t
[B, G*H] fp32 (the step's input projection), ``state`` a tuple of [B, H] fp32 tensors whose first
is the output h, ``params`` the tensors every step reads (the recurrent weight, transposed, in
``compute_dtype``, and whatever else the cell needs), ``h_mask`` None or [B, H]. ``window_loop``
runs it over a window as plain differentiable ops (autograd derives the backward); ``CompiledWindow``
runs the same loop with the step compiled by ``torch.compile``: one small graph per step shape,
never one per window length.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from lm import kernels

log = logging.getLogger("lm.recurrence")

COMPILE_ENV = "LM_COMPILE"  # 0: never compile the window (GPU), the eager loop runs instead
RECOMPILE_LIMIT = 64  # graphs of the step kept per process (dynamo's default of 8 would silently run the rest eagerly)

Step = Callable[..., tuple[torch.Tensor, ...]]


def step_mask(h_mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """The mask on h_{t-1} at step t: None, the shared [B, H] one, or step t's of [T, B, H]."""
    return None if h_mask is None else (h_mask if h_mask.dim() == 2 else h_mask[t])


def window_loop(
    step: Step,
    x_proj: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    params: tuple[torch.Tensor, ...],
    h_mask: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``step`` over time-major x_proj [T, B, G*H] fp32 from ``state``: outputs [T, B, H] and the final state."""
    outputs = []
    for t in range(x_proj.size(0)):
        state = step(x_proj[t], state, params, step_mask(h_mask, t), compute_dtype)
        outputs.append(state[0])
    return torch.stack(outputs), state


def _signature(*tensors: torch.Tensor | None) -> tuple:
    """What a compiled graph is specialised on, per input: shape, dtype, whether it needs a gradient."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)


class CompiledWindow:
    """``window_loop`` with its step compiled: one small graph per step shape, mask kind, dtype and
    gradient pattern (a training run sees two: the first step, whose carried state needs no
    gradient, and the others), never one per window length, so a window of any length (the last,
    shorter window of an epoch) compiles nothing new.

    The first time a signature is met, its forward and backward are compiled on a copy of the step's
    inputs (AOTAutograd compiles the backward lazily, inside the training step's ``backward()``,
    where a failure could not be caught). Where compiling fails (no Triton, an unsupported GPU), one
    warning line, then ``None`` from every call: the caller runs the eager window instead, and
    ``status()`` (recorded in metrics.json) says so and why."""

    def __init__(self, step: Step, what: str, compile_fn: Callable = torch.compile):
        self.what = what
        self.reason: str | None = f"{COMPILE_ENV}=0" if os.environ.get(COMPILE_ENV, "1") == "0" else None
        self.failed = self.reason is not None
        if not self.failed:  # a process may train several shapes (the bench: 3 sizes, 2 dtypes, 2 gradient patterns)
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        self._step = None if self.failed else compile_fn(step, fullgraph=True, dynamic=False)
        self._ready: set[tuple] = set()  # signatures whose forward and backward compiled
        self.windows = 0  # windows run compiled

    def __call__(self, x_proj, state, params, h_mask, compute_dtype) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        if self.failed:
            return None
        try:
            # contiguous: a step of a transposed batch-first projection has a stride that grows with the
            # window's length, and a graph is specialised on strides
            result = window_loop(self._checked_step, x_proj.contiguous(), state, params, h_mask, compute_dtype)
        except Exception as err:  # a compiler or backend failure; the same math runs eagerly
            self.failed = True
            self.reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            log.warning("compiling the %s window failed (%s); training runs the slower eager loop", self.what, self.reason)
            return None
        self.windows += 1
        return result

    def _checked_step(self, x_t, state, params, h_mask, compute_dtype):
        key = (_signature(x_t, *state, *params, h_mask), compute_dtype, torch.is_grad_enabled())
        if key not in self._ready:
            self._compile_both_ways(x_t, state, params, h_mask, compute_dtype)
            self._ready.add(key)
        return self._step(x_t, state, params, h_mask, compute_dtype)

    def _compile_both_ways(self, x_t, state, params, h_mask, compute_dtype) -> None:
        """The compiled step once on detached copies of its inputs (same strides: a transposed weight
        stays a transposed view), and its gradient, so that both graphs exist (or fail here) before a
        training step relies on them."""
        copy = lambda t: t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731  (clone keeps the strides)
        x_copy, state_copy, param_copy = copy(x_t), tuple(map(copy, state)), tuple(map(copy, params))
        mask = None if h_mask is None else h_mask.detach()
        new_state = self._step(x_copy, state_copy, param_copy, mask, compute_dtype)
        wanted = [t for t in (x_copy, *state_copy, *param_copy) if t.requires_grad]
        if wanted and torch.is_grad_enabled():
            torch.autograd.grad(sum(t.sum() for t in new_state), wanted)

    def status(self) -> dict[str, str | int | None]:
        """How the GPU's masked or bf16 layers ran their time loop, for metrics.json."""
        return {
            "path": "eager loop" if self.failed else "compiled step (torch.compile)",
            "fallback_reason": self.reason,
            "compiled_signatures": len(self._ready),
            "windows_compiled": self.windows,
        }


@functools.cache
def compiled_window(step: Step, what: str) -> CompiledWindow:
    """The process's compiled window of ``step`` (compiled graphs are cached per process anyway)."""
    return CompiledWindow(step, what)


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


def compute_dtype_of(device_type: str) -> torch.dtype:
    """The dtype of the products: autocast's where it is on, else fp32."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
