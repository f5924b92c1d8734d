"""Helpers shared by the tests: synthetic corpora and composed configs."""

from __future__ import annotations

import random
from pathlib import Path

from lm.config import TrainConfig, compose, validate

REPO = Path(__file__).resolve().parent.parent


def write_corpus(folder: Path, lines: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A small corpus with some structure (so a model can learn) in train/valid/test.txt."""
    lines = lines or {"train": 300, "valid": 40, "test": 40}
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the company", "our model", "she", "he", "the market"]
    verbs = ["said", "sees", "buys", "sold", "likes", "expects"]
    objects = ["the fish", "shares", "a house", "N dollars", "the <unk>", "stocks", "a plan"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in lines.items():
        text = "\n".join(f" {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} " for _ in range(n))
        (folder / f"{split}.txt").write_text(text + "\n")
    return folder


def train_config(overrides: list[str]) -> TrainConfig:
    return validate(compose("train", overrides))


def tiny_overrides(corpus: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "data=custom",
        f"data.dir={corpus}",
        "data.batch_size=4",
        "data.bptt=5",
        "trainer.progress=false",
        "trainer.threads=1",
        "trainer.device=cpu",
        *extra,
    ]


def record_layer_calls(monkeypatch) -> list[tuple]:
    """Every training-time run of a cell's own time loop: (layer, input, state, h_mask, output)."""
    from lm.model.cells import CELLS

    calls = []
    for cell in CELLS.values():

        def recording(layer, x, state, h_mask=None, w_hh=None, real=cell.window):
            result = real(layer, x, state, h_mask=h_mask, w_hh=w_hh)
            calls.append((layer, x.detach(), state, h_mask, result[0].detach()))
            return result

        monkeypatch.setattr(cell, "window", recording)
    return calls


def reference_lstm(layer, x, state, h_masks):
    """The LSTM equations step by step, with h_masks[t] on h_{t-1} (gate order i, f, g, o):
    what nn.LSTM and the LSTM cell's own loop (lm.model.cells.lstm) must compute. Returns (outputs, (h, c)) like nn.LSTM."""
    import torch
    from torch import nn

    h, c = state[0][0], state[1][0]
    outputs = []
    for t in range(x.size(1)):
        gates = nn.functional.linear(x[:, t], layer.weight_ih_l0, layer.bias_ih_l0) + nn.functional.linear(
            h * h_masks[t], layer.weight_hh_l0, layer.bias_hh_l0
        )
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs, 1), (h.unsqueeze(0), c.unsqueeze(0))


class LSTMCompiled:
    """The LSTM's compiled window called as the LSTM's eager ``LSTMWindow`` is: (x_proj, h0, c0, w_hh,
    mask, dtype) -> (out, h, c), or None where compiling failed."""

    def __init__(self, compile_fn=None):
        from lm.model.cells.loop import CompiledWindow
        from lm.model.cells.lstm import lstm_step

        self.window = CompiledWindow(lstm_step, "LSTM", *([compile_fn] if compile_fn else []))

    def __call__(self, x_proj, h0, c0, w_hh, mask, dtype):
        if self.window.failed:
            return None
        result = self.window(x_proj, (h0, c0), (w_hh.to(dtype).t(),), mask, dtype)
        return None if result is None else (result[0], *result[1])

    def __getattr__(self, name):
        return getattr(self.window, name)


def lstm_loop(x_proj, h0, c0, w_hh, mask, dtype):
    """The LSTM step's plain loop (what a GPU compiles), called as ``LSTMWindow`` is."""
    from lm.model.cells.loop import window_loop
    from lm.model.cells.lstm import lstm_step

    out, (h, c) = window_loop(lstm_step, x_proj, (h0, c0), (w_hh.to(dtype).t(),), mask, dtype)
    return out, h, c
