"""What a recurrent cell is to the language model: one layer over a BPTT window.

A cell class subclasses the library's single-layer module (``nn.LSTM``, ``nn.GRU``) for its
parameters, so checkpoints keep the library's names (``weight_ih_l0``, ``weight_hh_l0``, ...), and
its fused implementation (oneDNN on CPU, cuDNN on GPU) runs whenever nothing must reach inside the
recurrence. Where something must, ``window`` runs the cell's own time loop, which takes the mask on
h_{t-1} (the variational and recurrent dropout variants) and runs bf16 products with fp32 state.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lm.model.cells.loop import CompiledWindow, Step, compiled_window
from lm.model.cells.state import LayerState


class RecurrentCell:
    """The interface (a mixin beside ``nn.LSTM`` / ``nn.GRU``). ``name`` is the config's
    ``model.cell``; ``gates``, the row blocks of the weights (4 for the LSTM's i, f, g, o); ``state_names``
    the tensors of the layer's state, h first (it is also the layer's output)."""

    name: ClassVar[str]
    gates: ClassVar[int]
    state_names: ClassVar[tuple[str, ...]]
    step: ClassVar[Step]  # one time step of the own loop (``lm.model.cells.loop``), as a staticmethod
    hidden_size: int
    training: bool

    def initial_state(self, batch_size: int, like: torch.Tensor) -> LayerState:
        """Zeros, [1, batch, hidden] each, on ``like``'s device and in its dtype."""
        return tuple(torch.zeros(1, batch_size, self.hidden_size, device=like.device, dtype=like.dtype) for _ in self.state_names)

    def run(self, x: torch.Tensor, state: LayerState, h_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState]:
        """x [B, T, H_in] -> outputs [B, T, H] and the final state. The library's fused layer, which
        nothing can reach inside, unless training needs the cell's own loop: to mask h_{t-1}, or under
        autocast (bf16). There, on CPU, oneDNN's bf16 layers are slower than ours, and on a GPU autocast
        would run cuDNN's RNNs in fp16 (its rule for RNNs), weights, state and all, where the precision
        contract is bf16 products with fp32 gates and state. Without a mask the own loop computes the
        library's function."""
        if self.training and (h_mask is not None or torch.is_autocast_enabled(x.device.type)):
            return self.window(x, state, h_mask=h_mask)
        return self(x, state)

    def window(
        self, x: torch.Tensor, state: LayerState, h_mask: torch.Tensor | None = None, w_hh: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerState]:
        """The cell's own time loop over x [B, T, H_in]: the library layer's call and result, with
        ``h_mask`` (None, [B, H] for every step, or [T, B, H], already scaled) on h_{t-1} and ``w_hh``
        in place of the recurrent weight. Products in the autocast dtype, everything else fp32."""
        raise NotImplementedError

    @classmethod
    def compiled_window(cls) -> CompiledWindow:
        """The process's compiled window of this cell's step (GPU training)."""
        return compiled_window(cls.step, cls.name.upper())

    @classmethod
    def compiled_status(cls) -> dict[str, str | int | None]:
        """How this cell's compiled GPU window fared in this process (for metrics.json)."""
        return cls.compiled_window().status()
