"""Which connections of the language model carry a dropout mask, found by running it: the probe
behind the pictures in results/figures/ (``lm.reporting.figures``) and the test that holds each
dropout variant to the paper's statement of it.

The probe runs the real ``LanguageModel`` forward in training mode and watches the tensors at
its modules' boundaries: the embedding's output, each layer's input and output (whichever path
runs the layer: the library's fused layer or the cell's own time loop ``window``) and the decoder's input.
A connection between two of them carries a mask where the tensor that arrives has zeros that the
tensor that left does not: the kept/dropped pattern is read off the tensors themselves, so it is
whatever the model's code drew (``FreshDropout``'s kernel, a locked mask, a word mask), never a
second copy of that code. Inside a layer, the mask on h_{t-1} is the one the model hands its time
loop (``h_mask``), and DropConnect is what a parametrization makes of the recurrent weight. A
layer whose training output differs from its deterministic (eval) output on the same input while
neither was seen stops the probe (``ProbeError``): something masks the recurrence unseen.

    input ->[m]-> layer 1 ->[m]-> layer 2 ->[m]-> softmax      (zaremba: m fresh at every step)
               h1_{t-1} ->[m]-> h1_t, h2_{t-1} ->[m]-> h2_t    (recurrent, variational)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from lm.model.language_model import LanguageModel

PER_STEP = "per step"  # a fresh mask at every time step
PER_SEQUENCE = "per sequence"  # one mask for the whole sequence (each batch row its own)
WEIGHTS = "weights"  # DropConnect: entries of a weight matrix dropped, one mask per forward
# Where DropConnect on a cell's weight lands: the recurrent weights carry h_{t-1} -> h_t, the input
# weights the connection into the layer (the parameter names every cell keeps from nn.LSTM / nn.GRU).
WEIGHT_CONNECTION = {"weight_hh_l0": "recurrent", "weight_ih_l0": "into"}
TOLERANCE = 1e-4  # a layer whose output moves by more than this between train and eval mode is stochastic


class ProbeError(RuntimeError):
    """The model computes something the probe cannot account for; the probe must learn it first."""


@dataclass(frozen=True, order=True)
class Connection:
    """An edge of the unrolled network: ``input`` -> ``layer 1`` ... ``layer L`` -> ``softmax``
    (non-recurrent), or ``layer l`` -> ``layer l`` (recurrent: h^l_{t-1} -> h^l_t)."""

    source: str
    target: str

    @property
    def recurrent(self) -> bool:
        return self.source == self.target

    def __str__(self) -> str:
        return f"h_(t-1) -> h_t of {self.source}" if self.recurrent else f"{self.source} -> {self.target}"


def node(index: int, num_layers: int) -> str:
    """Node ``index`` of the vertical path: 0 the input, 1..L the layers, L+1 the softmax."""
    return "input" if index == 0 else "softmax" if index == num_layers + 1 else f"layer {index}"


def connections(num_layers: int) -> list[Connection]:
    """Every connection of an L-layer model: the L+1 non-recurrent ones bottom to top, then the L recurrent."""
    vertical = [Connection(node(i, num_layers), node(i + 1, num_layers)) for i in range(num_layers + 1)]
    return vertical + [Connection(node(i, num_layers), node(i, num_layers)) for i in range(1, num_layers + 1)]


@dataclass(frozen=True)
class Mask:
    """One mask the probe saw: where, how it varies over time, and its pattern.

    ``kept``: bool, True where a value passes; [batch, time, units] for a unit mask (for h_{t-1},
    step t is the mask on h_{t-1} that step t reads), [rows, columns] of the weight for ``WEIGHTS``.
    ``whole_steps``: some step of some row dropped every unit (word-level dropout drops a word).
    """

    connection: Connection
    kind: str
    kept: torch.Tensor
    whole_steps: bool = False


@dataclass
class ProbeResult:
    num_layers: int
    masks: list[Mask]  # in the order of ``connections``
    hidden: list[torch.Tensor] = field(default_factory=list)  # each layer's output h_t, [batch, time, hidden]

    def on(self, connection: Connection) -> list[Mask]:
        return [m for m in self.masks if m.connection == connection]

    def placement(self) -> dict[Connection, tuple[str, ...]]:
        """Every connection with the kinds of mask it carries (empty: none)."""
        return {c: tuple(m.kind for m in self.on(c)) for c in connections(self.num_layers)}


def time_structure(kept: torch.Tensor) -> str:
    """``PER_SEQUENCE`` if every row lets the same units through at every step (steps that drop
    every unit, a dropped word, aside), else ``PER_STEP``. kept: bool [batch, time, units]."""
    if kept.size(1) < 2:
        raise ValueError("telling a mask per step from one per sequence needs at least 2 time steps")
    for row in kept:
        live = row[row.any(-1)]
        if len(live) and not bool((live == live[0]).all()):
            return PER_STEP
    return PER_SEQUENCE


def _unit_mask(connection: Connection, left: torch.Tensor, arrived: torch.Tensor) -> Mask | None:
    """The mask between the tensor that left a module and the one that arrived at the next, if any."""
    if left.shape != arrived.shape:
        raise ProbeError(f"{connection}: {tuple(left.shape)} left, {tuple(arrived.shape)} arrived")
    kept = (arrived != 0) | (left == 0)  # a value that left as 0 tells nothing: counted as kept
    if bool(kept.all()):
        return None
    return Mask(connection, time_structure(kept), kept, whole_steps=bool((~kept.any(-1)).any()))


def _h_mask(connection: Connection, h_mask: torch.Tensor, steps: int) -> Mask | None:
    """The mask the model gave the layer's time loop for h_{t-1}: [batch, H] for every step, or [time, batch, H]."""
    kept = h_mask != 0
    kept = kept.unsqueeze(1).expand(-1, steps, -1) if kept.dim() == 2 else kept.permute(1, 0, 2)
    if bool(kept.all()):
        return None
    return Mask(connection, time_structure(kept), kept)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside, as many as before after: the same result however many cores, and
    for the probe's small forward passes no time lost waiting for other threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _recording(model: LanguageModel) -> Iterator[dict]:
    """Hooks on the model's modules and on its call of the time loop, removed on leaving."""
    seen: dict = {"layers": {}, "h_masks": {}, "weights": []}
    layers = list(model.layers)
    hooks = [
        model.embedding.register_forward_hook(lambda module, args, out: seen.__setitem__("embedding", out)),
        model.decoder.register_forward_pre_hook(lambda module, args: seen.__setitem__("decoder", args[0])),
    ]
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(lambda m, args, out, i=index: seen["layers"].__setitem__(i, (args[0], out[0]))))
        for name, chain in getattr(layer, "parametrizations", {}).items():
            hooks.append(
                chain.register_forward_hook(lambda m, args, out, i=index, n=name: seen["weights"].append((i, n, m, out)))
            )

    def watched(index: int, real_window):
        def window(x, state, h_mask=None, w_hh=None):
            out = real_window(x, state, h_mask=h_mask, w_hh=w_hh)
            seen["layers"][index] = (x, out[0])
            if h_mask is not None:
                seen["h_masks"][index] = h_mask
            return out

        return window

    for index, layer in enumerate(layers):  # the cell's own time loop, the one place a mask on h_{t-1} enters
        layer.window = watched(index, layer.window)
    try:
        yield seen
    finally:
        for layer in layers:
            del layer.window
        for hook in hooks:
            hook.remove()


def probe(model: LanguageModel, ids: torch.Tensor, seed: int = 0) -> ProbeResult:
    """Run ``model`` forward in training mode over ``ids`` [batch, time] from a zero state, torch's
    generator seeded with ``seed`` (the caller's generator state is restored after), on one thread,
    and report every mask it drew on every connection. The model's mode is restored after."""
    was_training = model.training
    state = model.init_state(ids.size(0))
    try:
        with one_thread():
            with torch.random.fork_rng(devices=[]), torch.no_grad(), _recording(model) as seen:
                torch.manual_seed(seed)
                model.train()
                model(ids, state)
            masks = _masks(model, seen, state)
    finally:
        model.train(was_training)
    hidden = [seen["layers"][i][1].detach().clone() for i in range(model.num_layers)]
    return ProbeResult(model.num_layers, masks, hidden)


def _masks(model: LanguageModel, seen: dict, state) -> list[Mask]:
    L = model.num_layers
    missing = [i + 1 for i in range(L) if i not in seen["layers"]]
    if missing or "embedding" not in seen or "decoder" not in seen:
        raise ProbeError(f"the forward pass ran no layer(s) {missing} the probe could watch, or skipped the embedding or decoder")
    # what left each node going up, and what arrived at the next one
    left = [seen["embedding"]] + [seen["layers"][i][1] for i in range(L)]
    arrived = [seen["layers"][i][0] for i in range(L)] + [seen["decoder"]]
    found: dict[Connection, list[Mask]] = {c: [] for c in connections(L)}
    for i in range(L + 1):
        connection = Connection(node(i, L), node(i + 1, L))
        if (mask := _unit_mask(connection, left[i], arrived[i])) is not None:
            found[connection].append(mask)
    steps, inside = left[0].size(1), set()  # the layers with a mask inside them
    for i, h_mask in seen["h_masks"].items():
        connection = Connection(node(i + 1, L), node(i + 1, L))
        if (mask := _h_mask(connection, h_mask, steps)) is not None:
            found[connection].append(mask)
            inside.add(i)
    for i, name, chain, weight in seen["weights"]:
        where = WEIGHT_CONNECTION.get(name)
        if where is None:
            raise ProbeError(f"layer {i + 1}'s {name} is parametrized, and the probe knows no connection it carries")
        connection = Connection(node(i + 1 if where == "recurrent" else i, L), node(i + 1, L))
        kept = (weight != 0) | (chain.original == 0)
        if not bool(kept.all()) and not any(m.kind == WEIGHTS for m in found[connection]):
            found[connection].append(Mask(connection, WEIGHTS, kept.detach().clone()))
            inside.add(i)
    _check_layers_accounted_for(model, seen, state, inside)
    return [m for c in connections(L) for m in found[c]]


def _check_layers_accounted_for(model: LanguageModel, seen: dict, state, inside: set[int]) -> None:
    """A layer's output in training must equal its eval-mode output on the same input and state
    exactly when the probe saw no mask inside it (on h_{t-1} or on its weights)."""
    model.eval()
    with torch.no_grad(), parametrize.cached():
        for i, layer in enumerate(model.layers):
            x, trained = seen["layers"][i]
            plain, _ = layer(x, state[i])
            stochastic = float((trained.float() - plain.float()).abs().max()) > TOLERANCE
            if stochastic != (i in inside):
                what = (
                    "changes its output, but the probe saw no mask inside it" if stochastic else "has a mask that changed nothing"
                )
                raise ProbeError(f"in training, layer {i + 1} {what}")
