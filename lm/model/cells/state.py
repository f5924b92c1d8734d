"""The recurrent state as the engine carries it, whatever the cell.

A layer's state is a tuple of tensors, each [1, batch, hidden] (the LSTM's (h, c), the GRU's
(h,)), and a model's state one such tuple per layer. The engine only ever needs operations that
treat every tensor alike along the batch dimension (1): cut the graph between windows, copy the
carried values, take or gather the rows of a process, flatten for a captured graph. They live here,
so that nothing outside ``lm.model.cells`` knows how many tensors a cell carries or what they mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LayerState = tuple[torch.Tensor, ...]
State = list[LayerState]
BATCH_DIM = 1


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """``fn`` applied to every tensor of every layer, the structure kept."""
    return [tuple(fn(t) for t in layer) for layer in state]


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while carrying the values over (in fp32, also
    when a fused kernel under bf16 autocast returned them in bf16)."""
    return map_state(lambda t: t.detach().float(), state)


def copy_state(state: State) -> State:
    """Detached copies: a CUDA graph rewrites its output buffers at the next replay."""
    return map_state(lambda t: t.detach().float().clone(), state)


def state_rows(state: State, rows: slice | torch.Tensor, device: torch.device | None = None) -> State:
    """This process's rows (streams) of a state saved for the whole batch."""
    return map_state(lambda t: t[:, rows].to(device) if device is not None else t[:, rows], state)


def gather_state(state: State, gather_rows: Callable[[torch.Tensor, int], torch.Tensor]) -> State:
    """Every process's rows in one state (``gather_rows(tensor, batch_dim)``, a collective)."""
    return map_state(lambda t: gather_rows(t, BATCH_DIM), state)


def flatten_state(state: State) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """The tensors in one list, and the layout that ``unflatten_state`` needs to rebuild it."""
    return [t for layer in state for t in layer], tuple(len(layer) for layer in state)


def unflatten_state(flat: Sequence[torch.Tensor], layout: tuple[int, ...]) -> State:
    state, start = [], 0
    for size in layout:
        state.append(tuple(flat[start : start + size]))
        start += size
    return state
