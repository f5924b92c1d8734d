"""What every command needs before it can work: the device, the corpus, a model from a
checkpoint, the code's commit. Used by lm.train, lm.evaluate, lm.ensemble and
lm.generate, so it lives below all of them and imports none of them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch

from lm.checkpoint import CheckpointError
from lm.config import ConfigError, DataConfig, validate_saved
from lm.data import Corpus, ensure_ptb, load_corpus, resolve_data_dir
from lm.model import LSTMLanguageModel


def select_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` as a device; cuda without a GPU is a config error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device is cuda but no GPU is visible: use trainer.device=cpu")
    return torch.device(name)


def load_data(data: DataConfig) -> Corpus:
    """The corpus a data config names (PTB is downloaded if allowed, and MD5-checked)."""
    folder = resolve_data_dir(data.dir, is_ptb=data.name == "ptb")
    if data.name == "ptb":
        ensure_ptb(folder, data.url, download=data.download)
    return load_corpus(folder)


def build_model_from_checkpoint(ckpt: dict[str, Any], vocab_size: int) -> LSTMLanguageModel:
    """The checkpoint's model with its weights; refuses a vocabulary of another size."""
    cfg = validate_saved(ckpt["config"])
    saved_vocab = ckpt["model"]["embedding.weight"].shape[0]
    if saved_vocab != vocab_size:
        raise CheckpointError(f"checkpoint has a vocabulary of {saved_vocab} words, the corpus {vocab_size}: use the corpus it was trained on")
    model = LSTMLanguageModel.from_config(cfg.model, vocab_size)
    model.load_state_dict(ckpt["model"])
    return model


def git_commit() -> str | None:
    """The commit of this checkout, with ``-dirty`` if tracked files changed; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")
