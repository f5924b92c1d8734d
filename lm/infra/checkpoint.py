"""Checkpoints as data, written atomically.

A checkpoint is a dict of state dicts, RNG states, the resolved config and
the training history, never a pickled module. It is written to a temporary
file in the same folder, fsynced and renamed over the old one, so a crash at
any moment leaves either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lm.infra.outputs import atomic_write, atomic_write_json, atomic_write_text  # noqa: F401  (their old home)

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"
FORMAT_VERSION = 1
# What every checkpoint holds, with its type: a dict missing one is refused before use.
REQUIRED = {"model": dict, "config": dict, "epoch": int}
# What a resume needs besides.
RESUME_REQUIRED = {"optimizer": dict, "rng": dict, "step": int, "history": list, "best_valid_ppl": float}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why."""


class RunFolderError(RuntimeError):
    """A run folder that is in use, or holds a run this command would replace; the message says what to do."""


class RunFolderLock:
    """An exclusive lock on a run folder for the life of the run (``flock`` on ``<folder>/.lock``).

    A second process that tries to write into the same folder fails at once with one line. The
    lock goes with the process (a crash or SIGKILL releases it); the file stays, holding the pid
    of the last owner. Local file systems only: ``flock`` on NFS may not exclude another host.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> RunFolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderError(
                f"{self.folder} is in use by another run (process {owner or 'unknown'}): wait for it to end, "
                f"or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def check_free(folder: str | os.PathLike) -> None:
        """Raise ``RunFolderError`` if a process holds ``folder``'s lock; creates and changes nothing."""
        path = Path(folder) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # no lock file: no run has held the folder
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise RunFolderError(
                f"{folder} is in use by another run (process {owner or 'unknown'}): wait for it to end, or choose another folder"
            ) from None
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def vocab_digest(words: list[str]) -> str:
    """SHA-256 of a vocabulary in id order: equal digests mean the same word for every id."""
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


def rng_state(device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """The generators a run on ``device`` draws from: torch's CPU generator and, for a GPU, that
    GPU's (no other device is touched). Every process of a data-parallel run holds the same state
    (``lm.model.dropout.BatchShare``), so rank 0's resumes any number of processes."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device = torch.device("cpu")) -> None:
    """Restore ``rng_state``'s generators for a run on ``device`` (a GPU state only onto a GPU).

    Older checkpoints hold a list with one state per GPU then visible; the run drew from the
    first (rank 0's device, every rank's draws being the same), so that one is used, whatever
    number of GPUs this machine has."""
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if device.type != "cuda" or saved is None:
        return
    if isinstance(saved, (list, tuple)):
        if not saved:
            return
        saved = saved[0]
    torch.cuda.set_rng_state(saved, device)


def rng_digest(state: dict[str, Any]) -> int:
    """A 63-bit digest of ``rng_state``'s generators: equal digests, equal states."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], before_commit: Callable[[], None] | None = None) -> None:
    payload = {"format_version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda f: torch.save(payload, f), before_commit=before_commit)


def load_checkpoint(path: str | os.PathLike, required: dict[str, type] | None = None) -> dict[str, Any]:
    """Load a checkpoint saved by ``save_checkpoint``; one clear error if it is not one, or if it
    lacks one of the fields every checkpoint has (``REQUIRED``) or ``required`` names."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_NAME).is_file():
        path = path / CHECKPOINT_NAME  # a run folder stands for its checkpoint
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: give the path of a checkpoint.pt written by lm.train")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({first[:120]}): use another one") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION or "model" not in payload:
        raise CheckpointError(
            f"{path} is not an lm checkpoint (format {FORMAT_VERSION}): use a checkpoint.pt written by lm.train"
        )
    for key, kind in {**REQUIRED, **(required or {})}.items():
        value = payload.get(key)
        if kind is float and isinstance(value, int):
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            found = "is missing" if key not in payload else f"is a {type(value).__name__}"
            raise CheckpointError(f"checkpoint {path} is damaged ({key!r} {found}, expected a {kind.__name__}): use another one")
    return payload
