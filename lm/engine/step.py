"""The paper's training step and one epoch of it, free of any run's bookkeeping.

One window: forward (under autocast for bf16), the cross-entropy summed over the window and
averaged over the batch, backward, global L2 clipping, plain SGD (plus an optional weight
shrink, for Gal's recipe). One epoch: that step over the windows in order, with the hidden
state carried (detached) between them and a host sync only every ``log_every`` steps. On a
GPU the step is replayed as a CUDA graph (``GraphedStep``, ``lm.engine.graphs``), and the host
then waits for the device only at the epoch's end.
``lm.train`` builds a run around these; scripts (``bench``, ``profile``) call them directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from lm.config import OptimConfig, TrainConfig
from lm.engine.graphs import StepGraphs, backend_for, graphs_mode
from lm.infra.faults import NonFiniteError, fault_point
from lm.kernels.weight_copies import WeightCopies, applies, fp32_norm
from lm.model.cells.state import State, copy_state, detach_state, flatten_state, unflatten_state
from lm.model.language_model import LanguageModel
from lm.model.loss import WindowLoss


def learning_rate(epoch: int, optim: OptimConfig) -> float:
    """The lr of 0-based ``epoch``.

    tf  (TF tutorial): lr * decay ** max(epoch + 1 - decay_start_epoch, 0),
        i.e. ``decay_start_epoch`` epochs at the full lr, as the paper states.
    lua (authors' code): decays one epoch later.
    """
    shift = 1 if optim.decay_convention == "tf" else 0
    return optim.lr * optim.lr_decay ** max(epoch + shift - optim.decay_start_epoch, 0)


# ---------------------------------------------------------------- one window, one epoch


@dataclass(frozen=True)
class StepOptions:
    """How every window of a run is trained (the paper's step and its options)."""

    max_grad_norm: float  # global L2 norm the gradients are clipped to
    weight_decay: float = 0.0  # fraction of every weight removed after each step, independent of the lr
    autocast_dtype: torch.dtype | None = None  # bf16: the forward under autocast; weights, loss and state stay fp32
    skip_nonfinite: bool = False  # skip a NaN/inf step (one host sync per step) instead of stopping at the next check
    objective: torch.nn.Module | None = None  # the model's WindowLoss, wrapped in DistributedDataParallel under torchrun
    weight_copies: bool = (
        True  # bf16: products read bf16 weight copies that the step rewrites, where they apply (lm.kernels.weight_copies)
    )
    cuda_graphs: bool = True  # GPU: replay the step as a CUDA graph where it applies (lm.engine.graphs; LM_CUDA_GRAPHS=0: never)

    @classmethod
    def from_config(cls, cfg: TrainConfig, objective: torch.nn.Module | None = None) -> StepOptions:
        """A run's options: the training (``lm.engine.run``) and the estimate of its hours build them here."""
        return cls(
            max_grad_norm=cfg.optim.max_grad_norm,
            weight_decay=cfg.optim.weight_decay,
            autocast_dtype=torch.bfloat16 if cfg.trainer.precision == "bf16" else None,
            skip_nonfinite=cfg.trainer.nonfinite == "skip",
            objective=objective,
        )


@dataclass(frozen=True)
class EpochLoop:
    """Where one call of ``train_epoch`` stops, and whom it tells how it goes."""

    max_steps: int | None = None  # steps of this call
    should_stop: Callable[[], bool] = lambda: False  # asked before every ``stop_every``-th step
    stop_every: int = 1  # steps between stop checks (each is a collective, with a host sync, under torchrun)
    epoch: int = 1  # 1-based, for messages
    step_offset: int = 0  # optimizer steps before this call: steps are numbered globally
    log_every: int = 100  # steps between host syncs: the non-finite check and ``on_log``
    on_log: Callable[[int, float, float], None] | None = None  # (step, mean training NLL so far, grad norm)
    bar: Any = None  # a progress bar, advanced by the tokens of each step

    def keeps_going(self, steps_here: int) -> bool:
        if self.max_steps is not None and steps_here >= self.max_steps:
            return False
        return steps_here % self.stop_every != 0 or not self.should_stop()


@dataclass
class EpochProgress:
    """Where an epoch stands; saved in a checkpoint when training stops mid-epoch."""

    window: int = 0  # index of the next window to train on
    nll: float = 0.0  # summed training NLL so far (nats)
    tokens: int = 0
    steps: int = 0
    skipped: int = 0  # non-finite steps skipped (trainer.nonfinite=skip)
    norm_sum: float = 0.0
    seconds: float = 0.0
    state: State | None = None  # hidden state carried into the next window

    @property
    def grad_norm(self) -> float:
        return self.norm_sum / max(self.steps - self.skipped, 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochProgress:
        return cls(**d)


class StepResult(NamedTuple):
    loss_sum: torch.Tensor  # summed over the window's tokens (nats), detached
    grad_norm: torch.Tensor  # before clipping, detached
    finite: torch.Tensor  # both of the above finite (a tensor: no host sync)
    state: State  # carried into the next window
    applied: bool  # False for a skipped non-finite step


def train_step(
    objective: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State,
    options: StepOptions,
    copies: WeightCopies | None = None,
) -> StepResult:
    """One window: forward, the loss summed over time and averaged over the batch, backward, clip, update.
    ``objective`` is the model's ``WindowLoss`` (under torchrun wrapped in DistributedDataParallel,
    whose backward averages the gradients across processes); ``copies``, the bf16 weight copies
    the products read, if any (their gradients are those weights' gradients)."""
    state = detach_state(state)
    with torch.autocast(x.device.type, dtype=options.autocast_dtype, enabled=options.autocast_dtype is not None):
        loss_sum, state = objective(x, y, state)  # the decoder and the loss fused on CPU
    (loss_sum / x.size(0)).backward()  # summed over time, averaged over the batch
    grad_norm = total_grad_norm(copies.gradients(params) if copies is not None else [p.grad for p in params])
    finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    applied = not (options.skip_nonfinite and not bool(finite))
    if applied:
        clipped_step(optimizer, params, grad_norm, options.max_grad_norm, copies)
        shrink_weights(params, options.weight_decay)
    optimizer.zero_grad(set_to_none=True)
    if copies is not None:
        copies.zero_grad()
    return StepResult(loss_sum.detach(), grad_norm.detach(), finite, state, applied)


def total_grad_norm(grads: list[torch.Tensor | None]) -> torch.Tensor:
    """The global L2 norm of the gradients, in fp32: torch's ``get_total_norm`` where every gradient
    is fp32; with the bf16 gradients of weight copies, each one's norm from ``lm.kernels.weight_copies``
    (torch's would be rounded to bf16, or made from an fp32 copy of the gradient)."""
    grads = [g for g in grads if g is not None]
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack([fp32_norm(g) for g in grads]))


def clipped_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    grad_norm: torch.Tensor,
    max_norm: float,
    copies: WeightCopies | None = None,
) -> None:
    """The optimizer's step on gradients clipped to a global L2 norm of ``max_norm`` (torch's rule).

    On CPU the clip factor is folded into the step's learning rate (reading the norm there costs no
    device sync), which saves a pass over every gradient; on a GPU the gradients are scaled in place,
    without a sync.
    """
    if grad_norm.device.type != "cpu":
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm, foreach=True)
        optimizer.step()
        return
    scale = min(1.0, max_norm / (float(grad_norm) + 1e-6))
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr * scale
        optimizer.step()
        if copies is not None:
            copies.step(optimizer)  # the weights whose gradients are their copies' (their own are None)
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr


def shrink_weights(params: list[torch.nn.Parameter], fraction: float) -> None:
    """w -= fraction * w, not scaled by the lr (Gal & Ghahramani's Lua code; SGD's own option would scale it)."""
    if fraction:
        with torch.no_grad():
            for p in params:
                p.mul_(1.0 - fraction)


# ---------------------------------------------------------------- the step as a CUDA graph


class GraphedStep:
    """``train_step`` as ``lm.engine.graphs.StepGraphs`` captures it: the same forward, loss,
    backward and global clipping, and plain SGD written out (``p -= lr * g``) with the lr read from a
    device tensor, so that the epoch's lr reaches the graph without a new capture. Autocast runs
    without its weight-cast cache, which a captured graph must not keep. The update differs from
    ``torch.optim.SGD``'s only in rounding (one multiply and one subtract instead of a fused add)."""

    def __init__(self, objective: torch.nn.Module, params: list[torch.nn.Parameter], optimizer, options: StepOptions, backend):
        self.objective, self.params, self.optimizer, self.options = objective, params, optimizer, options
        self.lr = torch.zeros((), dtype=torch.float32, device=params[0].device)
        self.lr_value: float | None = None
        self.state_layout: tuple[int, ...] = ()  # tensors per layer of the carried state (set by each call)
        self.graphs = StepGraphs(self._body, params, backend)

    def _body(self, inputs: list[torch.Tensor]):
        x, y, *flat = inputs
        state = unflatten_state(flat, self.state_layout)
        options = self.options
        with torch.autocast(
            x.device.type, dtype=options.autocast_dtype, enabled=options.autocast_dtype is not None, cache_enabled=False
        ):
            loss_sum, new_state = self.objective(x, y, state)
        (loss_sum / x.size(0)).backward()
        trained = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in trained]
        grad_norm = total_grad_norm(grads)
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        torch.nn.utils.clip_grads_with_norm_(trained, options.max_grad_norm, grad_norm, foreach=True)
        with torch.no_grad():
            torch._foreach_mul_(grads, self.lr)
            torch._foreach_sub_(trained, grads)
        shrink_weights(self.params, options.weight_decay)
        for p in self.params:
            p.grad = None
        return loss_sum.detach(), grad_norm.detach(), finite, detach_state(new_state)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, state: State, eager: Callable[[], StepResult]) -> StepResult:
        lr = self.optimizer.param_groups[0]["lr"]
        if lr != self.lr_value:  # once per epoch: a kernel on the stream, no host sync
            self.lr.fill_(lr)
            self.lr_value = lr
        flat, self.state_layout = flatten_state(detach_state(state))
        inputs = [x, y, *flat]
        out = self.graphs.run(inputs, eager)
        if isinstance(out, StepResult):
            return out
        loss_sum, grad_norm, finite, new_state = out
        return StepResult(loss_sum, grad_norm, finite, new_state, True)


# {model: {(optimizer, step options): GraphedStep}}: a run's graphs outlive each train_epoch call
_GRAPHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphs_not_applicable(
    device: torch.device, optimizer: torch.optim.Optimizer, options: StepOptions, objective: torch.nn.Module, copies: bool
) -> str | None:
    """Why the step cannot be replayed as a graph here, or None when it can."""
    if not options.cuda_graphs or graphs_mode() == "off":
        return "turned off (LM_CUDA_GRAPHS=0)" if graphs_mode() == "off" else "turned off for this loop"
    if backend_for(device) is None:
        return f"not a GPU ({device.type})"
    if options.skip_nonfinite:
        return "trainer.nonfinite=skip reads every step's loss on the host"
    if isinstance(objective, torch.nn.parallel.DistributedDataParallel):
        return "several processes (torchrun): DDP's gradient all-reduce is not captured"
    if copies:
        return "bf16 weight copies (CPU)"
    groups = optimizer.param_groups
    plain = isinstance(optimizer, torch.optim.SGD) and len(groups) == 1
    if not plain or any(groups[0].get(k) for k in ("momentum", "weight_decay", "nesterov", "maximize", "dampening")):
        return "an optimizer other than plain SGD with one parameter group"
    return None


def _graphed_step(
    model: LanguageModel, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, options: StepOptions, copies: bool
) -> GraphedStep | None:
    device = next(model.parameters()).device
    if graphs_not_applicable(device, optimizer, options, objective, copies) is not None:
        return None
    steps = _GRAPHED.setdefault(model, {})
    key = (id(optimizer), options)
    graphed = steps.get(key)
    if graphed is None or graphed.optimizer is not optimizer:
        graphed = steps[key] = GraphedStep(objective, list(model.parameters()), optimizer, options, backend_for(device))
    return graphed


def graphs_status(model: LanguageModel) -> dict[str, Any] | None:
    """What the step's graphs did for ``model`` in this process (None: no step was ever graphed):
    replays, eager steps, captured shapes, a failure and its reason."""
    steps = _GRAPHED.get(model)
    if not steps:
        return None
    statuses = [graphed.graphs.status() for graphed in steps.values()]
    return statuses[0] if len(statuses) == 1 else {"per_step_options": statuses}


def train_epoch(
    model: LanguageModel,
    windows: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    options: StepOptions | float | None = None,
    progress: EpochProgress | None = None,
    loop: EpochLoop | None = None,
    **fields: Any,
) -> EpochProgress:
    """Train on ``windows`` from ``progress.window`` on; returns where it stopped.

    Stops at the end of the windows, after ``loop.max_steps`` steps of this call, or at the first
    step boundary after ``loop.should_stop()`` turns true. The host syncs only every
    ``loop.log_every`` steps (and per step with ``options.skip_nonfinite``); with the step replayed
    as a CUDA graph, only at the end (the non-finite check and ``loop.on_log``'s scalars, each
    still of its step, are read then). Short form for scripts
    and tests: a number as ``options`` is its ``max_grad_norm``, and a field of either object can be
    given by name, e.g. ``train_epoch(model, windows, opt, 5.0, autocast_dtype=torch.bfloat16)``.
    """
    options, loop = _epoch_options(options, loop, fields)
    progress = progress or EpochProgress()
    model.train()
    device = next(model.parameters()).device
    params = list(model.parameters())
    objective = options.objective if options.objective is not None else WindowLoss(model)
    state = progress.state if progress.state is not None else model.init_state(windows[0][0].size(0))
    nll = torch.tensor(progress.nll, dtype=torch.float64, device=device)
    norm_sum = torch.tensor(progress.norm_sum, dtype=torch.float64, device=device)
    first_bad = torch.tensor(-1, device=device)  # global step of the first non-finite step, or -1
    use_copies = options.weight_copies and applies(model, optimizer, objective, options.autocast_dtype)
    graphed = _graphed_step(model, objective, optimizer, options, use_copies)
    logged: list[tuple[int, torch.Tensor, int, torch.Tensor]] = []  # graphed: step scalars read at the end, not mid-epoch
    steps_here, start = 0, time.perf_counter()
    with WeightCopies(model) if use_copies else contextlib.nullcontext() as copies:
        while progress.window < len(windows) and loop.keeps_going(steps_here):
            x, y = (t.to(device, non_blocking=True) for t in windows[progress.window])
            progress.window += 1
            progress.steps += 1
            steps_here += 1
            step = loop.step_offset + steps_here
            if graphed is not None:
                result = graphed(
                    x, y, state, lambda x=x, y=y, state=state: train_step(objective, params, optimizer, x, y, state, options)
                )
            else:
                result = train_step(objective, params, optimizer, x, y, state, options, copies)
            state = result.state
            if not result.applied:
                progress.skipped += 1
                continue
            first_bad = torch.where((first_bad < 0) & ~result.finite, step, first_bad)
            nll += result.loss_sum.double()
            norm_sum += result.grad_norm.double()
            progress.tokens += y.numel()
            fault_point("step", step)
            if loop.bar is not None:
                loop.bar.update(y.numel())
            if steps_here % loop.log_every == 0 and graphed is not None:  # no host sync inside a graphed epoch:
                if loop.on_log is not None:  # its checks and step scalars are read at its end
                    logged.append((step, nll.clone(), progress.tokens, result.grad_norm.clone()))
            elif steps_here % loop.log_every == 0:
                _raise_if_nonfinite(first_bad, loop.epoch)
                if loop.on_log is not None:
                    loop.on_log(step, float(nll) / max(progress.tokens, 1), float(result.grad_norm))
    _raise_if_nonfinite(first_bad, loop.epoch)
    for step, nll_then, tokens_then, norm_then in logged:
        loop.on_log(step, float(nll_then) / max(tokens_then, 1), float(norm_then))
    progress.nll, progress.norm_sum = float(nll), float(norm_sum)
    progress.seconds += time.perf_counter() - start
    # a graph's output buffers are rewritten by its next replay: the carried state is copied out
    progress.state = copy_state(state) if graphed is not None else detach_state(state)
    return progress


def _epoch_options(
    options: StepOptions | float | None, loop: EpochLoop | None, fields: dict[str, Any]
) -> tuple[StepOptions, EpochLoop]:
    """``train_epoch``'s arguments as the two objects (see its short form)."""
    own = {k: fields.pop(k) for k in list(fields) if k in StepOptions.__dataclass_fields__}
    if isinstance(options, StepOptions):
        options = dataclasses.replace(options, **own)
    else:
        options = StepOptions(**({} if options is None else {"max_grad_norm": options}), **own)
    return options, dataclasses.replace(loop or EpochLoop(), **fields)


def _raise_if_nonfinite(first_bad: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad)  # a host sync
    if bad >= 0:
        raise NonFiniteError(f"non-finite loss or gradient norm at epoch {epoch}, step {bad}")
