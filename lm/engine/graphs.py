"""A training step captured once per window shape as a CUDA graph, then replayed (GPU training).

Why: at batch 20 a window's kernels are small, and an eager step spends more time launching
them from Python than the GPU spends running them (cuDNN's LSTM launches a few kernels per
time step, the compiled time loop of the masked variants one call per step, clipping and SGD
a few more). Replayed as a graph, the whole step (forward, backward, global clipping, the SGD
update) is one launch from the host, and the host never waits for the GPU inside an epoch.

How (``StepGraphs``): per window shape, ``WARMUP_STEPS`` ordinary eager steps (on a side
stream, as CUDA graphs require: cuDNN, cuBLAS and torch.compile set themselves up there),
then the step function is captured with static inputs (x, y, the carried state: copied in
before every replay) and static outputs (the loss, the grad norm, the finite flag, the new
state). The caller provides the function (``lm.engine.step``). A shape seen fewer times (an
epoch's shorter last window, in its first epochs) runs eagerly. A capture that fails gives one
warning line, and every later step runs eagerly; ``status()`` says so in metrics.json.

``LM_CUDA_GRAPHS``: ``1`` (default) replays on a GPU; ``0`` never; ``emulate`` also on a CPU,
where ``EmulatedBackend`` stands in for the graph (capture and replay run the step's
function, with the bookkeeping of a real graph): the tests and the CPU dry run of the GPU plan
exercise the same code without a GPU. A CPU run without it is unchanged, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("lm.graphs")

GRAPHS_ENV = "LM_CUDA_GRAPHS"
WARMUP_STEPS = 3  # eager steps of a shape before its capture (PyTorch's examples use 3; DDP would need 11)


def graphs_mode() -> str:
    """``on`` (default: CUDA devices), ``off`` (``LM_CUDA_GRAPHS=0``) or ``emulate`` (CPU too)."""
    value = os.environ.get(GRAPHS_ENV, "1").strip().lower()
    return {"0": "off", "off": "off", "false": "off", "emulate": "emulate"}.get(value, "on")


def backend_for(device: torch.device) -> CudaGraphBackend | EmulatedBackend | None:
    """The graph backend for ``device`` under ``LM_CUDA_GRAPHS``, or None where steps run eagerly."""
    mode = graphs_mode()
    if mode == "off":
        return None
    if mode == "emulate":
        return EmulatedBackend()
    return CudaGraphBackend() if device.type == "cuda" else None


def _tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a step's outputs (tensors, and lists or tuples of them), in order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)):
        return [t for item in outputs for t in _tensors(item)]
    return []


class CudaGraphBackend:
    """torch.cuda.CUDAGraph: the real thing."""

    name = "cuda graph"

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn: Callable[[], Any], params: list[torch.Tensor]) -> tuple[Any, Any]:
        """Record ``fn`` (nothing runs: the kernels are recorded); returns the graph and the outputs it writes."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # synchronizes the device once, before capturing
            outputs = fn()
        return graph, outputs

    def replay(self, graph: Any) -> None:
        graph.replay()


@dataclass
class _EmulatedGraph:
    fn: Callable[[], Any]
    outputs: Any


class EmulatedBackend:
    """A CUDA graph's behaviour on any device: a capture leaves no trace (it runs the function on
    a snapshot, then restores the parameters and the CPU generator, as a real capture runs
    nothing), and returns output buffers that every replay rewrites in place."""

    name = "emulated graph"

    def side_stream(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def capture(self, fn: Callable[[], Any], params: list[torch.Tensor]) -> tuple[Any, Any]:
        saved = [p.detach().clone() for p in params]
        generator = torch.get_rng_state()
        outputs = fn()
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        torch.set_rng_state(generator)
        return _EmulatedGraph(fn, outputs), outputs

    def replay(self, graph: _EmulatedGraph) -> None:
        fresh = graph.fn()
        with torch.no_grad():
            for buffer, value in zip(_tensors(graph.outputs), _tensors(fresh)):
                buffer.copy_(value)


@dataclass
class _Shape:
    """One window shape: how often it ran eagerly, its graph, and the graph's input and output buffers."""

    seen: int = 0
    graph: Any = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: Any = None


class StepGraphs:
    """A step function of static inputs, captured per input shape after ``warmup`` eager steps,
    then replayed. ``body(inputs)`` is the step reading its inputs from the given buffers;
    ``run(inputs, eager)`` copies ``inputs`` into the shape's buffers and replays its graph, or
    calls ``eager()`` (the same step, run eagerly) while the shape warms up or after a failure."""

    def __init__(
        self, body: Callable[[list[torch.Tensor]], Any], params: list[torch.Tensor], backend, warmup: int = WARMUP_STEPS
    ):
        self.body, self.params, self.backend, self.warmup = body, params, backend, warmup
        self.shapes: dict[tuple, _Shape] = {}
        self.replays = 0
        self.eager_steps = 0
        self.failure: str | None = None

    def run(self, inputs: list[torch.Tensor], eager: Callable[[], Any]) -> Any:
        if self.failure is not None:
            self.eager_steps += 1
            return eager()
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        shape = self.shapes.setdefault(key, _Shape())
        if shape.graph is None:
            if shape.seen < self.warmup:
                shape.seen += 1
                self.eager_steps += 1
                with self.backend.side_stream():
                    return eager()
            if not self._capture(shape, inputs):
                self.eager_steps += 1
                return eager()
        for buffer, value in zip(shape.inputs, inputs):
            buffer.copy_(value)
        self.backend.replay(shape.graph)
        self.replays += 1
        return shape.outputs

    def _capture(self, shape: _Shape, inputs: list[torch.Tensor]) -> bool:
        shape.inputs = [t.detach().clone() for t in inputs]  # allocated before the capture, outside its memory pool
        try:
            shape.graph, shape.outputs = self.backend.capture(lambda: self.body(shape.inputs), self.params)
        except Exception as err:  # an op that cannot be captured (a host sync, a library's own stream); the step runs eagerly
            self.failure = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            shape.graph, shape.outputs = None, None
            for p in self.params:  # gradients a broken capture may have left
                p.grad = None
            log.warning(
                "capturing the training step as a %s failed (%s); training runs the eager step", self.backend.name, self.failure
            )
            return False
        return True

    def status(self) -> dict[str, Any]:
        """What ran, for metrics.json."""
        captured = [[list(s) for s, _ in key] for key, shape in self.shapes.items() if shape.graph is not None]
        return {
            "backend": self.backend.name,
            "replayed_steps": self.replays,
            "eager_steps": self.eager_steps,
            "captured_input_shapes": captured,
            "failure": self.failure,
        }
