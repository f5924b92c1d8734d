"""What a run may do with its folder, decided from what the folder holds before any work: start,
continue or replace the run there (and, when replacing, remove only that run's own files)."""

from __future__ import annotations

import shutil
from pathlib import Path

from lm.config import ConfigError, TrainerConfig
from lm.infra.checkpoint import CHECKPOINT_NAME, CheckpointError, RunFolderError

METRICS_NAME = "metrics.json"
# What a run writes into its folder: removed first by trainer.overwrite=true (tb/ is a folder).
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, "eval.json")


def claim_run_folder(out_dir: Path, trainer: TrainerConfig) -> Path | None:
    """What this run may do with ``out_dir``, decided from what the folder holds, before any work;
    returns the checkpoint to resume from, if any. Also used by the preflight of a single run.

    - ``trainer.overwrite=true``: the run there (if any) is replaced (its files are removed when
      training starts); with ``trainer.resume`` it is a contradiction.
    - no ``trainer.resume``: the folder must hold no run (no checkpoint.pt, no metrics.json).
    - ``trainer.resume=auto``: continue the folder's checkpoint.pt; none there starts afresh,
      unless metrics.json is there (a finished run without its checkpoint cannot be continued).
    - ``trainer.resume=PATH``: the folder must hold no run, unless PATH is its own checkpoint.
    """
    checkpoint, metrics = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    holds = (
        "a finished run"
        if metrics.exists()
        else "an unfinished run (checkpoint.pt, no metrics.json)"
        if checkpoint.exists()
        else None
    )
    resume = trainer.resume or None
    if trainer.overwrite:
        if resume is not None:
            raise ConfigError(
                f"trainer.overwrite=true replaces the run in {out_dir}, trainer.resume={resume} continues one: give one of them"
            )
        return None
    if resume is None:
        if holds:
            raise RunFolderError(
                f"{out_dir} already holds {holds}: pass trainer.resume=auto to continue it, "
                f"trainer.overwrite=true to replace it, "
                f"or hydra.run.dir=... for a new folder"
            )
        return None
    if resume == "auto":
        if checkpoint.exists():
            return checkpoint
        if metrics.exists():
            raise RunFolderError(
                f"{out_dir} holds a finished run's metrics.json but no checkpoint.pt, so trainer.resume=auto cannot continue it: "
                f"trainer.overwrite=true replaces it, or choose another folder with hydra.run.dir=..."
            )
        return None  # nothing there yet: a fresh run (a rerun of a sweep or of make ablation)
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if holds and path.resolve() != checkpoint.resolve():
        raise RunFolderError(
            f"{out_dir} already holds {holds}, which trainer.resume={resume} would replace: resume into a new folder "
            f"(hydra.run.dir=...), or pass trainer.overwrite=true"
        )
    if not path.is_file():
        raise CheckpointError(
            f"trainer.resume: checkpoint {path} does not exist: give the path of a checkpoint.pt written by lm.train"
        )
    return path


def clear_run_folder(out_dir: Path) -> None:
    """trainer.overwrite=true: remove the files of the run being replaced (under the folder's lock)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "tb", ignore_errors=True)
