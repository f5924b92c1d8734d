"""The LSTM language model of Zaremba et al. (2014).

embedding -> drop -> LSTM_1 -> drop -> ... -> LSTM_L -> drop -> linear softmax

Dropout sits in exactly L+1 places, all on the non-recurrent (vertical)
connections, with a fresh mask for every element at every time step. The
recurrence inside each layer (h_{t-1} -> h_t and the cell c) is never masked:
each layer is a fused single-layer ``nn.LSTM`` (cuDNN on GPU, the native
kernel on CPU), so nothing can reach inside it.
"""

from __future__ import annotations

import torch
from torch import nn

from lm.config import ModelConfig

State = list[tuple[torch.Tensor, torch.Tensor]]


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, dropout: float, init_scale: float):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.init_scale = init_scale
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(nn.LSTM(hidden_size, hidden_size, batch_first=True) for _ in range(num_layers))
        # One module per place so tests and hooks can see every mask: drops[0]
        # is on the embedding output, drops[l] on the output of layer l.
        self.drops = nn.ModuleList(nn.Dropout(dropout) for _ in range(num_layers + 1))
        self.decoder = nn.Linear(hidden_size, vocab_size)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab_size: int) -> "LSTMLanguageModel":
        return cls(vocab_size, cfg.hidden_size, cfg.num_layers, cfg.dropout, cfg.init_scale)

    def reset_parameters(self) -> None:
        """Every parameter, biases included, ~ U(-init_scale, init_scale), as in the paper."""
        for p in self.parameters():
            nn.init.uniform_(p, -self.init_scale, self.init_scale)

    def init_state(self, batch_size: int) -> State:
        p = self.decoder.weight
        zeros = lambda: torch.zeros(1, batch_size, self.hidden_size, device=p.device, dtype=p.dtype)  # noqa: E731
        return [(zeros(), zeros()) for _ in range(self.num_layers)]

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x: [batch, time] ids -> logits [batch, time, vocab] and the final state."""
        h = self.drops[0](self.embedding(x))
        new_state = []
        for layer, drop, layer_state in zip(self.layers, self.drops[1:], state):
            h, layer_state = layer(h, layer_state)
            h = drop(h)
            new_state.append(layer_state)
        return self.decoder(h), new_state


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while carrying the values over."""
    return [(h.detach(), c.detach()) for h, c in state]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
