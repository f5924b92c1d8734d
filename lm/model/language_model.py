"""The recurrent language model of Zaremba et al. (2014), with the dropout strategies
it is compared against, and the cell, as options of the same model (no copies).

embedding -> drop -> cell_1 -> drop -> ... -> cell_L -> drop -> linear softmax

With the default ``zaremba`` variant, dropout sits in exactly L+1 places, all
on the non-recurrent (vertical) connections, with a fresh mask for every
element at every time step. The recurrence inside each layer (h_{t-1} -> h_t,
and the LSTM's cell c) is never masked: each layer is a cell of ``lm.model.cells``
(the paper's LSTM, or a GRU), which runs the library's fused layer (cuDNN on GPU,
oneDNN on CPU) unless training needs its own time loop: for the variants that mask
h_{t-1} (``variational`` with a recurrent rate, ``recurrent``), whose mask the model
draws and hands to the cell, and for bf16 training (``RecurrentCell.run``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from lm.config import DROPOUT_VARIANTS as VARIANTS
from lm.config import ModelConfig, rates_used
from lm.model.cells import CELLS
from lm.model.cells.state import State
from lm.model.dropout import WHOLE_BATCH, BatchShare, FreshDropout, WeightDrop, inverted_mask, locked_mask, word_mask


class LanguageModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        init_scale: float,
        *,
        variant: str = "zaremba",
        dropout_embedding: float = 0.0,
        dropout_input: float = 0.0,
        dropout_recurrent: float = 0.0,
        dropout_output: float = 0.0,
        weight_drop: float = 0.0,
        tie_weights: bool = False,
        cell: str = "lstm",
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown dropout variant {variant!r}; one of {VARIANTS}")
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; one of {tuple(CELLS)}")
        self.cell = cell
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.init_scale = init_scale
        self.variant = variant
        self.dropout_embedding = dropout_embedding
        self.dropout_input = dropout_input
        self.dropout_recurrent = dropout_recurrent
        self.dropout_output = dropout_output
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(CELLS[cell](hidden_size, hidden_size) for _ in range(num_layers))
        # One module per place so tests and hooks can see every mask: drops[0]
        # is on the embedding output, drops[l] on the output of layer l
        # (zaremba and recurrent variants; rate 0 otherwise).
        fresh_rate = dropout if "dropout" in rates_used(variant) else 0.0
        self.drops = nn.ModuleList(FreshDropout(fresh_rate) for _ in range(num_layers + 1))
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        self.batch_share = WHOLE_BATCH
        self.weight_drop = weight_drop
        if weight_drop > 0:
            for layer in self.layers:
                parametrize.register_parametrization(layer, "weight_hh_l0", WeightDrop(weight_drop))
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab_size: int) -> LanguageModel:
        return cls(
            vocab_size,
            cfg.hidden_size,
            cfg.num_layers,
            cfg.dropout,
            cfg.init_scale,
            variant=cfg.dropout_variant,
            dropout_embedding=cfg.dropout_embedding,
            dropout_input=cfg.dropout_input,
            dropout_recurrent=cfg.dropout_recurrent,
            dropout_output=cfg.dropout_output,
            weight_drop=cfg.weight_drop,
            tie_weights=cfg.tie_weights,
            cell=cfg.cell,
        )

    def reset_parameters(self) -> None:
        """Every parameter, biases included, ~ U(-init_scale, init_scale), as in the paper."""
        for p in self.parameters():
            nn.init.uniform_(p, -self.init_scale, self.init_scale)

    def share_batch(self, share: BatchShare) -> None:
        """Train on ``share``'s rows of a global batch (data parallelism): every dropout mask is
        drawn for the global batch and cut to these rows (``lm.model.dropout.BatchShare``). The
        weight-drop mask is one for the whole batch, the same draw in every process."""
        self.batch_share = share
        for drop in self.drops:
            drop.share = share

    def init_state(self, batch_size: int) -> State:
        """Each layer's zero state, on the model's device and in its dtype."""
        return [layer.initial_state(batch_size, self.decoder.bias) for layer in self.layers]

    @property
    def masks_recurrence(self) -> bool:
        """Whether h_{t-1} is masked (variational with a recurrent rate, recurrent)."""
        return "dropout_recurrent" in rates_used(self.variant) and self.dropout_recurrent > 0

    def _locked(self, h: torch.Tensor, p: float) -> torch.Tensor:
        if not self.training or p == 0:
            return h
        return h * locked_mask(h.size(0), h.size(2), p, h, self.batch_share)

    def _recurrent_mask(self, h: torch.Tensor) -> torch.Tensor:
        """[batch, H] for variational (the same at every step), [time, batch, H] for recurrent (fresh per step)."""
        if self.variant == "variational":
            shape, batch_dim = (h.size(0), self.hidden_size), 0
        else:
            shape, batch_dim = (h.size(1), h.size(0), self.hidden_size), 1
        return inverted_mask(shape, self.dropout_recurrent, torch.float32, h.device, self.batch_share, batch_dim)

    def _run_layer(self, layer: nn.Module, h: torch.Tensor, state: tuple[torch.Tensor, ...]):
        """The layer's cell over the window, with a fresh mask on h_{t-1} when the variant draws one."""
        h_mask = self._recurrent_mask(h) if self.training and self.masks_recurrence else None
        return layer.run(h, state, h_mask=h_mask)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x: [batch, time] ids -> logits [batch, time, vocab] and the final state."""
        h, new_state = self.features(x, state)
        return self.decoder(h), new_state

    def features(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x: [batch, time] ids -> the decoder's input [batch, time, hidden] (after the top dropout)
        and the final state. Training feeds it to ``lm.model.loss.summed_nll``, which fuses the decoder."""
        h = self.embedding(x)
        variational = self.variant == "variational"
        if variational:
            if self.training and self.dropout_embedding > 0:
                h = h * word_mask(x, self.vocab_size, self.dropout_embedding, h.dtype, self.batch_share)
            h = self._locked(h, self.dropout_input)
        else:
            h = self.drops[0](h)
        new_state = []
        with parametrize.cached() if self.weight_drop > 0 else contextlib.nullcontext():
            for index, (layer, drop, layer_state) in enumerate(zip(self.layers, self.drops[1:], state)):
                h, layer_state = self._run_layer(layer, h, layer_state)
                if variational:
                    last = index == self.num_layers - 1
                    h = self._locked(h, self.dropout_output if last else self.dropout_input)
                else:
                    h = drop(h)
                new_state.append(layer_state)
        return h, new_state


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
