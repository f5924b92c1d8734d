"""Continuing a run from its checkpoint: the same model, the same vocabulary word for word, and the
same recipe unless ``trainer.allow_changes`` names a key."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lm.config import TrainConfig, resume_values, validate_saved
from lm.engine.run import Run
from lm.engine.runtime import check_vocab
from lm.infra.checkpoint import RESUME_REQUIRED, CheckpointError, load_checkpoint

log = logging.getLogger("lm.train")  # one logger for the whole training run (its train.log)


def resume(run: Run, path: Path) -> None:
    """Continue from the checkpoint at ``path`` (checked: same model, same vocabulary word for
    word, same recipe unless ``trainer.allow_changes`` names a key)."""
    ckpt = load_checkpoint(path, required=RESUME_REQUIRED)
    changed = check_resumable(ckpt, run.cfg, path)
    check_vocab(ckpt, run.corpus.vocab, "this run's corpus")
    try:
        run.restore(ckpt)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {path} cannot be resumed ({str(err).splitlines()[0][:160]}): it is damaged, use another one"
        ) from None
    run.changes += [{"key": k, "from": a, "to": b, "step": run.step} for k, a, b in changed]
    where = f"epoch {run.epochs_done + 1}, window {run.partial.window}" if run.partial else f"the end of epoch {run.epochs_done}"
    log.info("resumed from %s at %s (step %d)", path, where, run.step)


def _changed_keys(saved: TrainConfig, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, this run's value) of every key a resume must keep that differs."""
    before, after = resume_values(saved), resume_values(cfg)
    return [(key, before[key], after[key]) for key in before if before[key] != after[key]]


def check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, path: Path) -> list[tuple[str, Any, Any]]:
    """Refuse a checkpoint of another model, or one whose recipe this run changes (a key of
    ``RESUME_KEYS`` not in ``trainer.allow_changes``); returns the allowed changes. The vocabulary
    is compared when the corpus is loaded (``check_vocab``)."""
    _check_same_model(ckpt, cfg)
    changed = _changed_keys(validate_saved(ckpt["config"]), cfg)
    refused = [c for c in changed if c[0] not in cfg.trainer.allow_changes]
    if refused:
        key, before, after = refused[0]
        raise CheckpointError(
            f"{key} is {after!r} here but {before!r} in the checkpoint being resumed ({path}): resume with {key}={before}, "
            f"or pass trainer.allow_changes=[{key}] to change it from step {ckpt['step']} on"
            + (f" ({len(refused) - 1} more changed)" if len(refused) > 1 else "")
        )
    return changed


def _check_same_model(ckpt: dict[str, Any], cfg: TrainConfig) -> None:
    saved = validate_saved(ckpt["config"])
    for key in ("hidden_size", "num_layers"):
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if a != b:
            raise CheckpointError(
                f"checkpoint is from another model (model.{key} {a}, this run {b}): resume with the same model config"
            )
    for key in ("tie_weights", "dropout_variant"):
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if a != b:
            raise CheckpointError(
                f"checkpoint is from another model (model.{key} {a}, this run {b}): resume with the same model config"
            )
    if (saved.model.weight_drop > 0) != (cfg.model.weight_drop > 0):
        raise CheckpointError(
            "checkpoint is from another model (weight dropping on in one, off in the other): "
            "resume with the same model.weight_drop"
        )
