"""The one output policy of every command: what it may write, and how.

- A command writes only the files it names as its outputs, each through ``atomic_write``: a
  temporary file in the same folder, fsynced and renamed over the old one, so that a reader sees
  the old file or the new one, never half of one. A new file gets the mode the umask gives
  (0666 & ~umask), a replaced one keeps its own; an OS error while writing (a full disk, a
  read-only folder), however deep in a library it happened (``torch.save``, matplotlib), comes
  out as one ``OSError`` naming the file.
- Before any work, ``claim`` checks every output the command will write (``Output``): the
  place can be written; it is none of the command's own inputs (the checkpoint it reads, a
  corpus file); and a file already there is replaced only if the command can show that it wrote
  it (``Output.ours``: a results file of the right schema, a generated file with its marker, a
  run folder's manifest), else the command is refused in one line and nothing is written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm.config import ConfigError
from lm.infra.errors import UsageError
from lm.infra.schema import is_valid

# The OS errors of the machine, not of the code, that a write meets and a library may wrap in its own
# exception: a full disk or quota, a file too large, a read-only or unwritable place, a failing device.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode of a new file, as ``open()`` would create it: 0666 less the umask."""
    return 0o666 & ~umask()


def os_error_in(err: BaseException) -> OSError | None:
    """The OS error of the machine (``ENVIRONMENT_ERRNOS``) that ``err`` is or was raised from or while
    handling (libraries wrap them: ``torch.save`` in a RuntimeError, ``datasets`` in a
    DatasetGenerationError), if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in ENVIRONMENT_ERRNOS:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB blocks (MD5 for PTB's published sums)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", before_commit: Callable[[], None] | None = None
) -> None:
    """Write ``path`` through ``write(file)`` so that readers see old or new, never half.

    The file gets the mode the umask gives (or keeps the mode of the file it replaces). An OS error
    of the machine on the way (``ENVIRONMENT_ERRNOS``), wrapped or not by the library that met it, is
    raised as an ``OSError`` naming ``path``. ``before_commit`` runs after the data is on disk and
    before the rename (a test hook).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        file_mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        file_mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, mode) as f:
                os.fchmod(f.fileno(), file_mode)  # mkstemp's 0600, whatever the umask, is no mode for a result
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except Exception as err:
            found = os_error_in(err)
            if found is None:
                raise
            raise OSError(found.errno, found.strerror or os.strerror(found.errno), str(path)) from None
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------- checks before any work


def check_output_folder(folder: Path, option: str, error: type[Exception] = UsageError) -> None:
    """Refuse, before any work, an output folder that cannot be created or written (``error``
    names the kind: a command-line option, or a config key)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not writable"
        raise error(f"{option}: cannot write {folder} ({existing} {problem}): choose another folder")


def check_output_file(path: Path, key: str, error: type[Exception] = ConfigError) -> None:
    """Refuse, before any work, an output file that could not be written: a folder at its place,
    a file or an unwritable folder above it."""
    if path.is_dir():
        raise error(f"{key}: {path} is a folder: give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise error(f"{key}: {path} is not writable: choose another file")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not writable"
        raise error(f"{key}: cannot write {path} ({existing} {problem}): choose another place")


@dataclass(frozen=True)
class Output:
    """A file a command will write: where, which option or key names it (for messages), and how
    to recognise a file there that the command wrote before and so may replace."""

    path: Path
    option: str
    what: str  # what the command writes there, e.g. "an eval.json written by lm.evaluate"
    ours: Callable[[Path], bool]


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and relative spellings included)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def claim(outputs: Iterable[Output], inputs: Mapping[Path, str] | None = None, error: type[Exception] = UsageError) -> None:
    """Before any work: refuse an output that cannot be written, that is one of the command's
    ``inputs`` ({path: what it is}), or whose place holds a file the command cannot show it wrote."""
    for out in outputs:
        check_output_file(out.path, out.option, error)
        for source, what in (inputs or {}).items():
            if same_path(out.path, Path(source)):
                raise error(f"{out.option}: {out.path} is {what}, which this command reads: write to another file")
        if out.path.exists() and not out.ours(out.path):
            raise error(
                f"{out.option}: {out.path} exists and is not {out.what}, so it is not replaced: "
                f"move it away, or choose another place"
            )


# ---------------------------------------------------------------- how a command recognises its own files


def json_of(spec: Any) -> Callable[[Path], bool]:
    """A JSON results file of ``spec``'s shape (``lm.infra.schema``)."""
    return lambda path: is_valid(path, spec)


def text_with(marker: str, within: int = 8) -> Callable[[Path], bool]:
    """A text file with ``marker`` in its first ``within`` lines (a generated file's 'do not edit' line)."""

    def ours(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                head = "".join(f.readline() for _ in range(within))
        except (OSError, UnicodeDecodeError):
            return False
        return marker in head

    return ours


def text_starting(*prefixes: str) -> Callable[[Path], bool]:
    """A text file whose first line starts with one of ``prefixes``."""

    def ours(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().startswith(prefixes)
        except (OSError, UnicodeDecodeError):
            return False

    return ours


def png_of_size(width: int, height: int | None) -> Callable[[Path], bool]:
    """A PNG image of ``width`` x ``height`` pixels (the size a plot of ours is drawn at; a height of
    None: any, for a picture that grows with what it shows)."""

    def ours(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                head = f.read(24)
        except OSError:
            return False
        if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
            return False
        w, h = struct.unpack(">II", head[16:24])
        return w == width and (height is None or h == height)

    return ours
