"""Sample text from a trained model: ``python -m lm.generate checkpoint=PATH prompt="the company said"``.

The prompt is fed through the model (unknown words become ``<unk>``, with a
warning), then ``words`` words are sampled one at a time from the softmax at
``temperature``, optionally restricted to the ``top_k`` most likely words.
``seed`` makes a sample repeatable. ``<eos>`` is printed as a line break.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from omegaconf import DictConfig

from lm.checkpoint import load_checkpoint
from lm.cli import run_hydra
from lm.config import ConfigError, validate_saved
from lm.data import EOS, UNK, DataError, Vocab
from lm.model import LSTMLanguageModel
from lm.runtime import build_model_from_checkpoint, load_data, select_device


def encode_prompt(prompt: str, vocab: Vocab, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)) -> list[int]:
    ids = []
    for word in prompt.split():
        if word in vocab:
            ids.append(vocab[word])
        elif UNK in vocab:
            warn(f"{word!r} is not in the vocabulary; using {UNK}")
            ids.append(vocab[UNK])
        else:
            raise DataError(f"prompt word {word!r} is not in the vocabulary, which has no {UNK}: change the prompt")
    return ids or [vocab[EOS]]  # no prompt: start as after a sentence end


@torch.no_grad()
def sample(
    model: LSTMLanguageModel, prompt_ids: list[int], words: int, temperature: float, top_k: int | None, seed: int
) -> list[int]:
    """Ids of ``words`` sampled continuations of ``prompt_ids``."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    state = model.init_state(1)
    logits, state = model(torch.tensor([prompt_ids], device=device), state)
    out: list[int] = []
    for _ in range(words):
        scores = logits[0, -1].float() / temperature
        if top_k is not None and top_k < scores.numel():
            threshold = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        next_id = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
        out.append(int(next_id))
        logits, state = model(next_id.view(1, 1), state)
    return out


def render(words: list[str]) -> str:
    return " ".join(words).replace(f" {EOS} ", "\n").replace(f" {EOS}", "\n").replace(EOS, "\n").strip()


def checkpoint_vocab(ckpt: dict[str, Any]) -> Vocab:
    """The vocabulary a checkpoint was trained with (rebuilt from its data if not stored)."""
    if ckpt.get("vocab"):
        return Vocab(ckpt["vocab"])
    return load_data(validate_saved(ckpt["config"]).data).vocab


def run_generation(cfg: DictConfig) -> str:
    if not cfg.checkpoint:
        raise ConfigError("checkpoint: give the path of a checkpoint.pt written by lm.train")
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature must be a positive number, got {cfg.temperature!r}")
    if not (isinstance(cfg.words, int) and cfg.words >= 1):
        raise ConfigError(f"words must be a positive integer, got {cfg.words!r}")
    if cfg.top_k is not None and not (isinstance(cfg.top_k, int) and cfg.top_k >= 1):
        raise ConfigError(f"top_k must be null or a positive integer, got {cfg.top_k!r}")
    ckpt = load_checkpoint(cfg.checkpoint)
    vocab = checkpoint_vocab(ckpt)
    model = build_model_from_checkpoint(ckpt, len(vocab)).to(select_device(cfg.device))
    prompt_ids = encode_prompt(str(cfg.prompt or ""), vocab)
    ids = sample(model, prompt_ids, cfg.words, float(cfg.temperature), cfg.top_k, cfg.seed)
    prompt = str(cfg.prompt or "").strip()
    text = (prompt + " " if prompt else "") + render(vocab.decode(ids))
    print(text)
    return text


def _hydra_entry() -> None:
    run_hydra(run_generation, "generate")


if __name__ == "__main__":
    _hydra_entry()
