"""Sample text from a trained model, for ``python -m lm.generate checkpoint=PATH prompt="the company said"``.

The prompt is fed through the model (unknown words become ``<unk>``, with a
warning), then ``words`` words are sampled one at a time from the softmax at
``temperature``, optionally restricted to the ``top_k`` most likely words.
``seed`` makes a sample repeatable. ``<eos>`` is printed as a line break.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lm.config import validate_generate, validate_saved
from lm.data.corpus import EOS, UNK, Vocab
from lm.engine.runtime import build_model_from_checkpoint, load_user_data, select_device
from lm.infra.checkpoint import CheckpointError, load_checkpoint
from lm.infra.errors import DataError
from lm.model.language_model import LanguageModel


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
    model: LanguageModel, prompt_ids: list[int], words: int, temperature: float, top_k: int | None, seed: int
) -> list[int]:
    """Ids of ``words`` sampled continuations of ``prompt_ids``.

    The randomness is one uniform number per word from a host generator seeded by ``seed``
    (``draw``), not a device generator: the same seed gives the same words on every device."""
    model.eval()
    device = next(model.parameters()).device
    uniforms = random.Random(seed)
    state = model.init_state(1)
    logits, state = model(torch.tensor([prompt_ids], device=device), state)
    out: list[int] = []
    for _ in range(words):
        scores = scaled_scores(logits[0, -1], temperature)
        if top_k is not None and top_k < scores.numel():
            threshold = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        next_id = draw(torch.softmax(scores, dim=-1), uniforms.random())
        out.append(int(next_id))
        logits, state = model(next_id.view(1, 1), state)
    return out


def scaled_scores(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, whose softmax is the distribution to draw from.

    As the temperature goes to 0 that quotient overflows to inf and its softmax is NaN (at 1e-40
    the draw always returned the last word of the vocabulary). Then the scores are shifted so that
    the largest is 0 and divided in fp64: every other word's score goes to -inf and the softmax to
    the most likely word (greedy), the limit it tends to. Where the quotient is finite it is used
    as it is, so that a seed gives the words it always gave."""
    scores = logits.float() / temperature
    shifted = ((logits.double() - logits.double().max()) / temperature).float()
    return torch.where(torch.isfinite(scores).all(), scores, shifted)  # chosen on the device: no host sync


def draw(probs: torch.Tensor, u: float) -> torch.Tensor:
    """The id whose interval of the cumulative distribution holds ``u`` (in [0, 1)) times the
    total, as a [1] tensor on ``probs``' device: a word of probability p is drawn with probability
    p, one of probability 0 never (its interval is empty)."""
    cdf = probs.double().cumsum(0)
    return torch.searchsorted(cdf[:-1], cdf[-1:] * u, right=True)


def render(words: list[str]) -> str:
    return " ".join(words).replace(f" {EOS} ", "\n").replace(f" {EOS}", "\n").replace(EOS, "\n").strip()


def checkpoint_vocab(ckpt: dict[str, Any], data_dir: str | None = None) -> Vocab:
    """The vocabulary a checkpoint was trained with: stored in it, or (older checkpoints) rebuilt
    from the corpus folder the user gives, never from the folder the checkpoint names."""
    if ckpt.get("vocab"):
        try:
            return Vocab(ckpt["vocab"])
        except (ValueError, TypeError):
            raise CheckpointError(
                "checkpoint is damaged (its stored vocabulary has repeated or non-text words): use another one"
            ) from None
    return load_user_data(data_dir, validate_saved(ckpt["config"])).vocab


def run_generation(cfg: DictConfig) -> str:
    g = validate_generate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    device = select_device(g.device, "device")
    ckpt = load_checkpoint(g.checkpoint)
    vocab = checkpoint_vocab(ckpt, g.data_dir)
    model = build_model_from_checkpoint(ckpt, vocab).to(device)
    prompt_ids = encode_prompt(g.prompt, vocab)
    ids = sample(model, prompt_ids, g.words, g.temperature, g.top_k, g.seed)
    prompt = g.prompt.strip()
    text = (prompt + " " if prompt else "") + render(vocab.decode(ids))
    print(text)
    return text
