"""Recurrent cells: each owns one layer's parameters, its state and its time loop.

The language model stacks cells (``CELLS[name](input_size, hidden_size)``) and calls ``run``; the
engine carries their states through ``lm.model.cells.state``. Neither knows what a state holds.
A new cell is a module here (a ``RecurrentCell`` beside the library's layer, its step, its
windows), its name in ``CELLS`` and in ``lm.config.CELLS``, and its tests.
"""

from __future__ import annotations

from lm.model.cells.base import RecurrentCell
from lm.model.cells.gru import GRULayer
from lm.model.cells.lstm import LSTMLayer

CELLS: dict[str, type[RecurrentCell]] = {cell.name: cell for cell in (LSTMLayer, GRULayer)}


def cell_of_weights(weights: dict, hidden_size: int) -> str | None:
    """The cell whose first layer's recurrent weight has the shape of ``weights``' (a model's state
    dict), or None: a checkpoint's weights must be its config's cell's."""
    w = weights.get("layers.0.weight_hh_l0")
    if w is None or getattr(w, "dim", lambda: 0)() != 2 or hidden_size <= 0:
        return None
    return next((name for name, cell in CELLS.items() if tuple(w.shape) == (cell.gates * hidden_size, hidden_size)), None)
