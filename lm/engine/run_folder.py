"""What a run may do with its folder, decided from what the folder holds before any work: start,
continue or replace the run there (and, when replacing, remove only that run's own files).

A run lists the files it writes in its folder's manifest (``manifest.json``: the checkpoint,
metrics.json and its TensorBoard event files, over every process of the run). Replacing a run
(``trainer.overwrite=true``) removes only what the manifest lists, and the ``eval.json`` that
``lm.evaluate`` wrote for that run's checkpoint; a run from before manifests is recognised by its
files' content (a checkpoint of this project, a metrics.json of its schema, TensorBoard's event
files). Anything else in the folder (a user's notes, a csv in tb/) stays, and a file at a name
the run writes that is not a run's own is never replaced: the run is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import torch

from lm.config import ConfigError, TrainerConfig
from lm.infra.checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, RunFolderError
from lm.infra.outputs import atomic_write_json, same_path
from lm.infra.schema import EVAL, METRICS, is_valid

METRICS_NAME = "metrics.json"
MANIFEST_NAME = "manifest.json"
EVAL_NAME = "eval.json"
TB_NAME = "tb"
WRITER = "lm.train"
# What every run writes into its folder (listed in its manifest when it starts), besides its event files in tb/.
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME)


def read_manifest(folder: Path) -> list[str] | None:
    """The files a run's manifest lists (relative paths inside ``folder``), or None where there is no
    manifest written by lm.train."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != WRITER or not isinstance(data.get("files"), list):
        return None
    files = [f for f in data["files"] if isinstance(f, str)]
    # only plain relative paths inside the folder: a damaged or hostile manifest removes nothing outside it
    return [f for f in files if f and not PurePosixPath(f).is_absolute() and ".." not in PurePosixPath(f).parts]


def record_run_files(folder: Path, names: Iterable[str]) -> None:
    """Add ``names`` (relative paths) to the folder's manifest, keeping what earlier processes of the run listed."""
    listed = read_manifest(folder) or []
    files = listed + [name for name in names if name not in listed]
    atomic_write_json(folder / MANIFEST_NAME, {"written_by": WRITER, "files": files})


def _is_run_checkpoint(path: Path) -> bool:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a file that is not a checkpoint
        return False
    return isinstance(payload, dict) and payload.get("format_version") == FORMAT_VERSION


def _is_runs_eval(folder: Path) -> bool:
    """An eval.json that lm.evaluate wrote for this folder's checkpoint (its default output)."""
    path = folder / EVAL_NAME
    if not is_valid(path, EVAL):
        return False
    return same_path(Path(json.loads(path.read_text())["checkpoint"]), folder / CHECKPOINT_NAME)


def run_files(folder: Path) -> list[Path]:
    """The files of the run in ``folder`` that replacing it removes (see the module docstring)."""
    listed = read_manifest(folder)
    if listed is not None:
        files = [folder / name for name in listed] + [folder / MANIFEST_NAME]
    else:  # a run from before manifests: its files as their content shows them
        files = [p for p in (folder / CHECKPOINT_NAME,) if p.is_file() and _is_run_checkpoint(p)]
        files += [p for p in (folder / METRICS_NAME,) if is_valid(p, METRICS)]
        files += sorted((folder / TB_NAME).glob("events.out.tfevents.*"))
    if (folder / EVAL_NAME).is_file() and _is_runs_eval(folder):
        files.append(folder / EVAL_NAME)
    return [p for p in files if p.is_file()]


def foreign_files(folder: Path) -> list[Path]:
    """Files at the names a run writes (checkpoint.pt, metrics.json, manifest.json) that are not a run's own."""
    found = []
    manifest = folder / MANIFEST_NAME
    if manifest.exists() and read_manifest(folder) is None:
        found.append(manifest)
    own = set(run_files(folder))
    found += [folder / name for name in RUN_FILES if (folder / name).exists() and folder / name not in own]
    return found


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
    if trainer.overwrite and resume is not None:
        raise ConfigError(
            f"trainer.overwrite=true replaces the run in {out_dir}, trainer.resume={resume} continues one: give one of them"
        )
    foreign = foreign_files(out_dir) if (trainer.overwrite or (out_dir / MANIFEST_NAME).exists()) else []
    if foreign:
        raise RunFolderError(
            f"{foreign[0]} was not written by a run of lm.train (no manifest of one lists it, and it does not hold one), "
            f"so a run never replaces it: move it away, or choose another folder with hydra.run.dir=..."
        )
    if trainer.overwrite:
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
    """trainer.overwrite=true: remove the files of the run being replaced (under the folder's lock), and
    nothing else (``run_files``); tb/ goes too if nothing else is left in it."""
    for path in run_files(out_dir):
        path.unlink(missing_ok=True)
    tb = out_dir / TB_NAME
    if tb.is_dir() and not any(tb.iterdir()):
        tb.rmdir()
