"""Continuing a run from its checkpoint: the same model, the same vocabulary word for word, and the
same recipe unless ``trainer.allow_changes`` names a key."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from lm.config import EPOCH_BOUNDARY_KEYS, KERNELS, TrainConfig, resume_values, validate_saved
from lm.engine.run import Run
from lm.engine.runtime import check_vocab
from lm.infra.checkpoint import CHECKPOINT_NAME, RESUME_REQUIRED, CheckpointError, load_checkpoint
from lm.infra.outputs import same_path

log = logging.getLogger("lm.train")  # one logger for the whole training run (its train.log)


def resume(run: Run, path: Path) -> None:
    """Continue from the checkpoint at ``path`` (checked: same model, same vocabulary word for
    word, same recipe unless ``trainer.allow_changes`` names a key)."""
    ckpt = load_checkpoint(path, required=RESUME_REQUIRED)
    changed = check_resumable(ckpt, run.cfg, path, run.kernels)
    check_vocab(ckpt, run.corpus.vocab, "this run's corpus")
    try:
        run.restore(ckpt)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {path} cannot be resumed ({str(err).splitlines()[0][:160]}): it is damaged, use another one"
        ) from None
    run.changes += [{"key": k, "from": a, "to": b, "step": run.step} for k, a, b in changed]
    run.resumed_here = same_path(path, run.out_dir / CHECKPOINT_NAME)
    _count_earlier_windows(run, validate_saved(ckpt["config"]))
    where = f"epoch {run.epochs_done + 1}, window {run.partial.window}" if run.partial else f"the end of epoch {run.epochs_done}"
    log.info("resumed from %s at %s (step %d)", path, where, run.step)


def _count_earlier_windows(run: Run, saved: TrainConfig) -> None:
    """Epochs recorded before the history held their number of windows: the saved batching's, so that
    ``completed`` still tells a whole epoch after a change of batching at an epoch boundary."""
    if all("windows" in epoch for epoch in run.history):
        return
    columns = run.corpus.train.numel() // saved.data.batch_size
    windows = math.ceil((columns - 1) / saved.data.bptt)  # what bptt_windows cuts a batchified split into
    for epoch in run.history:
        epoch.setdefault("windows", windows)


def _changed_keys(saved: TrainConfig, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, this run's value) of every key a resume must keep that differs."""
    before, after = resume_values(saved), resume_values(cfg)
    return [(key, before[key], after[key]) for key in before if before[key] != after[key]]


def check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, path: Path, kernels: str | None = None) -> list[tuple[str, Any, Any]]:
    """Refuse a checkpoint of another model, or one whose recipe this run changes (a key of
    ``RESUME_KEYS`` not in ``trainer.allow_changes``), or that trained on other kernels than
    ``kernels`` (``lm.kernels.path``) unless ``kernels`` is allowed too; returns the allowed changes.
    A change of batching (``EPOCH_BOUNDARY_KEYS``) is applied at an epoch boundary only: from a
    mid-epoch checkpoint it is refused. The vocabulary is compared when the corpus is loaded
    (``check_vocab``)."""
    _check_same_model(ckpt, cfg)
    changed = _changed_keys(validate_saved(ckpt["config"]), cfg)
    saved_kernels = ckpt.get("kernels")
    if kernels is not None and isinstance(saved_kernels, str) and saved_kernels != kernels:
        changed.append((KERNELS, saved_kernels, kernels))
    refused = [c for c in changed if c[0] not in cfg.trainer.allow_changes]
    if refused and refused[0][0] == KERNELS:
        where = (
            "LM_FUSED=0"
            if saved_kernels == "pytorch"
            else "a compiler, a writable $TORCH_EXTENSIONS_DIR or ~/.cache, LM_FUSED unset"
        )
        raise CheckpointError(
            f"{path} trained on the {saved_kernels} kernels, this run would train on the {kernels} ones, whose dropout "
            f"masks differ, so it would not continue the same run: resume where the {saved_kernels} kernels run ({where}), "
            f"or pass trainer.allow_changes=[{KERNELS}]"
        )
    if refused:
        key, before, after = refused[0]
        raise CheckpointError(
            f"{key} is {after!r} here but {before!r} in the checkpoint being resumed ({path}): resume with {key}={before}, "
            f"or pass trainer.allow_changes=[{key}] to change it from step {ckpt['step']} on"
            + (f" ({len(refused) - 1} more changed)" if len(refused) > 1 else "")
        )
    partial = ckpt.get("partial_epoch")
    boundary = [c for c in changed if c[0] in EPOCH_BOUNDARY_KEYS]
    if partial and boundary:
        key, before, after = boundary[0]
        epoch = ckpt["epoch"] + 1
        raise CheckpointError(
            f"{key} changes the windows of an epoch, so it changes only at an epoch boundary, and {path} was saved in the "
            f"middle of epoch {epoch}: finish that epoch first (resume with {key}={before} trainer.epochs={epoch}), "
            f"then resume with {key}={after}"
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
