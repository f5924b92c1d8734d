from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.config import ConfigError, compose
from lm.data.corpus import UNK, Vocab
from lm.engine.generation import draw, encode_prompt, run_generation
from lm.engine.training import train
from lm.infra.checkpoint import load_checkpoint

from helpers import tiny_overrides, train_config, write_corpus


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    corpus = write_corpus(root / "corpus")
    train(train_config(tiny_overrides(corpus, "trainer.max_steps=60")), root / "run")
    return root / "run" / "checkpoint.pt"


def gen(checkpoint: Path, *overrides: str) -> str:
    return run_generation(compose("generate", [f"checkpoint={checkpoint}", *overrides]))


def test_samples_are_repeatable_and_seed_dependent(checkpoint):
    a = gen(checkpoint, "prompt=the company", "words=30", "seed=0")
    assert a.startswith("the company ") and len(a.split()) >= 2
    assert gen(checkpoint, "prompt=the company", "words=30", "seed=0") == a
    assert gen(checkpoint, "prompt=the company", "words=30", "seed=1") != a


def test_top_k_one_is_greedy(checkpoint):
    assert gen(checkpoint, "prompt=she", "top_k=1", "seed=0") == gen(checkpoint, "prompt=she", "top_k=1", "seed=5")


def test_words_come_from_the_vocabulary(checkpoint):
    vocab = Vocab(load_checkpoint(checkpoint)["vocab"])
    text = gen(checkpoint, "words=40", "temperature=0.7")
    assert set(text.split()) <= set(vocab.itos)


def test_draw_inverts_the_cumulative_distribution():
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3])
    assert [int(draw(probs, u)) for u in (0.0, 0.1, 0.5, 0.69, 0.71, 0.999)] == [0, 0, 2, 2, 3, 3]
    counts = torch.bincount(torch.cat([draw(probs, (i + 0.5) / 1000) for i in range(1000)]), minlength=4)
    assert counts.tolist() == [200, 0, 500, 300]  # uniform u: each word as often as its probability, never a 0


def test_unknown_prompt_words_map_to_unk_with_a_warning():
    warnings = []
    vocab = Vocab(["the", "cat", UNK, "<eos>"])
    assert encode_prompt("the zebra", vocab, warn=warnings.append) == [0, 2]
    assert warnings == [f"'zebra' is not in the vocabulary; using {UNK}"]


@pytest.mark.parametrize("override, message", [("temperature=0", "temperature"), ("words=0", "words"), ("top_k=0", "top_k")])
def test_bad_generation_settings(checkpoint, override, message):
    with pytest.raises(ConfigError, match=message):
        gen(checkpoint, override)
