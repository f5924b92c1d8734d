"""What every command needs before it can work: the device, the corpus, a model from a
checkpoint, the code's commit. Used by lm.train, lm.evaluate, lm.ensemble and
lm.generate, so it lives below all of them and imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from lm.config import ConfigError, DataConfig, TrainConfig, validate_saved
from lm.data.corpora import corpus_layout, layout_in
from lm.data.corpus import Corpus, Vocab, ensure, load_corpus
from lm.infra.checkpoint import CheckpointError, vocab_digest
from lm.kernels import cpu_info
from lm.model.cells import cell_of_weights
from lm.model.language_model import LanguageModel


def select_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` as a device; cuda without a GPU is a config error naming ``key``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is cuda but no GPU is visible: use {key}=cpu")
    return torch.device(name)


@contextlib.contextmanager
def fp32_products(tf32: bool):
    """What fp32 means on a GPU while this context is open: IEEE fp32 products everywhere, or
    TF32 in every product (cuBLAS and cuDNN, its LSTM included) with ``tf32``. PyTorch's own
    defaults differ per library (cuDNN's LSTM in TF32, cuBLAS in IEEE), so a model would train
    and evaluate in a mix. Process-wide flags of torch: restored on exit. No effect on a CPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def precision_record(device: torch.device, precision: str, tf32: bool) -> dict[str, str | bool]:
    """How a run's numbers were computed, for metrics.json (``fp32_products`` is the GPU side)."""
    on_gpu = device.type == "cuda"
    fp32 = "tf32" if on_gpu and tf32 else "ieee fp32"
    return {
        "trainer.precision": precision,
        "tf32": tf32 and on_gpu,
        "products": "bf16 (autocast), fp32 accumulation" if precision == "bf16" else fp32,
        "elementwise_and_state": "fp32 (gates, cell, carried state, softmax, loss, weights)",
        "evaluation_products": fp32,
    }


def hardware(device: torch.device) -> dict[str, str | None]:
    """What a run's timings must be read against: the CPU model and its bf16 instructions, and the GPU."""
    cpu = cpu_info()
    return {
        "cpu": cpu["model"],
        "cpu_bf16": cpu["bf16"],
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def provenance(device: torch.device) -> dict[str, Any]:
    """What every written result records about where it was made: code, library, device, hardware, threads."""
    return {
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "device": str(device),
        "hardware": hardware(device),
        "threads": torch.get_num_threads(),
    }


def load_data(data: DataConfig) -> Corpus:
    """The corpus a training config names, in its layout (downloaded if it has a source and
    ``data.download`` allows, and MD5-checked where it has sums)."""
    layout = corpus_layout(data.name)
    folder = layout.folder(data.dir)
    ensure(layout, folder, data.url or None, download=data.download)
    return load_corpus(folder, layout, check_md5=False)  # ensure has checked them


def load_user_data(data_dir: str | None, saved: TrainConfig, key: str = "data_dir") -> Corpus:
    """The corpus to evaluate a checkpoint on, from the user's command only.

    A checkpoint is untrusted input: its saved ``data.dir``, ``data.url`` and ``data.download``
    are never used (they could create folders or download from anywhere). PTB comes from
    ``key`` or ``$LM_DATA_DIR`` or ``data/ptb``, never downloaded here; a corpus with no default
    folder needs ``key``. A folder in another known layout is read in that one (a PTB copy saved
    as train.txt, valid.txt, test.txt); the vocabulary check decides whether it is the right corpus.
    """
    layout = corpus_layout(saved.data.name)
    if data_dir is None and layout.default_dir is None:
        raise ConfigError(f"the checkpoint was trained on the {saved.data.name!r} corpus: give its folder with {key}=PATH")
    folder = Path(data_dir).expanduser() if data_dir is not None else layout.folder(layout.default_dir)
    found = layout_in(folder)
    if data_dir is None and not any(path.exists() for path in found.files(folder).values()):
        env = layout.folder_env
        where = f"${env}" if env and os.environ.get(env) else key
        raise ConfigError(f"no {layout.label} files in {folder}: run `make data`, or give the folder with {where}=PATH")
    return load_corpus(folder, found)


def check_vocab(ckpt: dict[str, Any], vocab: Vocab, what: str = "the corpus") -> None:
    """Refuse a corpus whose vocabulary is not the checkpoint's, word for word (ids included):
    the same size with other words would give a meaningless perplexity."""
    saved = ckpt.get("vocab")
    if saved is None:  # checkpoints from before the vocabulary was stored: only the size can be compared
        size = ckpt["model"]["embedding.weight"].shape[0] if "embedding.weight" in ckpt["model"] else None
        if size is not None and size != len(vocab):
            raise CheckpointError(
                f"checkpoint has a vocabulary of {size} words, {what} {len(vocab)}: use the corpus it was trained on"
            )
        return
    if not isinstance(saved, list) or ckpt.get("vocab_sha256", vocab_digest(saved)) != vocab_digest(saved):
        raise CheckpointError("checkpoint is damaged (its stored vocabulary does not match its digest): use another one")
    if saved == vocab.itos:
        return
    if len(saved) != len(vocab):
        raise CheckpointError(
            f"checkpoint has a vocabulary of {len(saved)} words, {what} {len(vocab)}: use the corpus it was trained on"
        )
    i = next(i for i, (a, b) in enumerate(zip(saved, vocab.itos)) if a != b)
    raise CheckpointError(
        f"checkpoint's vocabulary differs from {what}'s (same {len(saved)} words in size, but id {i} is {saved[i]!r} there, "
        f"{vocab.itos[i]!r} here): use the corpus it was trained on"
    )


def build_model_from_checkpoint(ckpt: dict[str, Any], vocab: Vocab | int) -> LanguageModel:
    """The checkpoint's model with its weights; refuses another vocabulary (word for word when
    ``vocab`` is a ``Vocab``) or weights that do not fit the saved config."""
    cfg = validate_saved(ckpt["config"])
    if isinstance(vocab, Vocab):
        check_vocab(ckpt, vocab)
        vocab_size = len(vocab)
    else:
        vocab_size = vocab
        saved = len(ckpt["vocab"]) if ckpt.get("vocab") else ckpt["model"]["embedding.weight"].shape[0]
        if saved != vocab_size:
            raise CheckpointError(
                f"checkpoint has a vocabulary of {saved} words, the corpus {vocab_size}: use the corpus it was trained on"
            )
    check_cell(ckpt, cfg.model.cell, cfg.model.hidden_size)
    model = LanguageModel.from_config(cfg.model, vocab_size)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint's weights do not fit its model ({first[:160]}): the file is damaged, use another one"
        ) from None
    return model


def check_cell(ckpt: dict[str, Any], cell: str, hidden_size: int) -> None:
    """Refuse a checkpoint whose weights are another cell's than its config names."""
    weights = ckpt.get("model")
    found = cell_of_weights(weights, hidden_size) if isinstance(weights, dict) else None
    if found is not None and found != cell:
        raise CheckpointError(
            f"checkpoint's weights are a {found.upper()}'s but its config says model.cell={cell}: "
            "the file is damaged or was edited, use another one"
        )


def git_commit() -> str | None:
    """The commit of this checkout, with ``-dirty`` if tracked files changed; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")
