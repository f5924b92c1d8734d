"""The one error boundary of every command (``lm.train``, ``lm.evaluate``, ``lm.ensemble``,
``lm.generate``, ``lm.report``, ``lm.ablation``, ``lm.reproduce``, ``lm.data``).

An expected failure ends the command with one line on stderr and no traceback:

- exit 2: a user error (a bad config value, missing or unreadable data, a wrong
  checkpoint, a run folder that is taken, an OS error on a file: read-only, full disk);
- exit 3: training stopped on a NaN or infinite loss, gradient norm or perplexity;
- exit 128 + signal: stopped by SIGINT, SIGTERM or SIGUSR1 (a checkpoint written when training).

Anything else is a bug and keeps its traceback. For a single training run the config is
composed and checked *before* Hydra creates the run folder, so a rejected command writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lm.config import CONFIG_DIR, ConfigError, compose
from lm.infra.checkpoint import CheckpointError, RunFolderError
from lm.infra.errors import DataError, UsageError
from lm.infra.faults import NonFiniteError, TrainingInterrupted, stop_now

EXIT_USER_ERROR = 2
EXIT_NUMERICAL_FAULT = 3


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that end a command with one line (exit code 2, 3 or 128 + signal), no traceback."""
    return (
        ConfigError,
        DataError,
        CheckpointError,
        RunFolderError,
        UsageError,
        HydraException,
        OmegaConfBaseException,
        NonFiniteError,
        TrainingInterrupted,
        OSError,
        KeyboardInterrupt,
    )


def one_line(err: BaseException) -> str:
    """The error and its cause squeezed onto one line."""
    if isinstance(err, OSError) and err.strerror:  # name the file and what to do, not errno details
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)
        text = f"{where}: {err.strerror}" if where else err.strerror
        return _squeeze(f"{text}: check the path, its permissions and the free disk space")
    parts = [str(err)]
    if getattr(err, "override", None):  # Hydra's OverrideParseException: name the override
        parts.insert(0, f"cannot parse override {err.override!r}:")
    cause = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    if cause is not None and str(cause) and str(cause) not in parts[0]:
        parts.append(str(cause).splitlines()[0])
    return _squeeze(" ".join(parts))


def _squeeze(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."


def die(err: BaseException, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(code)


def exit_for(err: BaseException) -> None:
    """End the command for an expected failure: its one line and its exit code."""
    if isinstance(err, TrainingInterrupted):
        print(str(err), file=sys.stderr)
        raise SystemExit(err.exit_code)
    if isinstance(err, KeyboardInterrupt):
        print("stopped by SIGINT (Ctrl-C)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT)
    if isinstance(err, NonFiniteError):
        die(err, EXIT_NUMERICAL_FAULT)
    die(err)


def guarded(body: Callable[[], object]) -> None:
    """Run a command's body inside the error boundary (see the module docstring). SIGTERM and
    SIGUSR1, whose default is to die without a word, end it with one line too (training installs
    its own handlers, which checkpoint first)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            if signal.getsignal(sig) is signal.SIG_DFL:
                previous[sig] = signal.signal(sig, stop_now)
    try:
        body()
    except user_errors() as err:
        exit_for(err)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_on_user_error(task: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Wrap a Hydra task so that a user error exits at once (Hydra would add its own lines)."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> None:
        guarded(lambda: task(cfg))

    return wrapper


# Config keys that hold paths: their values are quoted for Hydra, so that any path works unquoted
# on the command line (a sweep job's folder has '=' and ',' in older runs; a space is fine too).
PATH_KEYS = ("checkpoint", "data_dir", "output", "data.dir", "trainer.resume", "hydra.run.dir", "hydra.sweep.dir")


def quote_paths(args: Sequence[str], keys: Sequence[str] = PATH_KEYS) -> list[str]:
    """``key=value`` for a path key becomes ``key='value'`` (Hydra's quoting), so that Hydra
    reads ``=``, ``,``, spaces and brackets in a path literally. Values already quoted, empty,
    ``null`` or holding an interpolation (``${...}``) are left as they are."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in keys and value and value != "null" and value[0] not in "'\"" and "${" not in value:
            value = "'" + value.replace("'", "\\'") + "'"
            arg = f"{key}={value}"
        out.append(arg)
    return out


def run_hydra(
    task: Callable[[DictConfig], None], config_name: str, preflight: Callable[[DictConfig], None] | None = None
) -> None:
    """The whole entry point of a command: ``task(cfg)`` under ``@hydra.main`` with ``configs/<config_name>.yaml``."""
    main = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(exit_on_user_error(task))
    run_app(main, config_name, preflight)


def run_app(hydra_main: Callable[[], None], config_name: str, preflight: Callable[[DictConfig], None] | None = None) -> None:
    """Run a ``@hydra.main`` function inside the error boundary, after ``preflight`` on the composed config."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let errors reach us instead of Hydra's printer
    sys.argv[1:] = quote_paths(sys.argv[1:])
    args = sys.argv[1:]
    if preflight is not None and not any(a.startswith("-") for a in args):
        guarded(lambda: preflight(compose(config_name, args, return_hydra_config=True)))
    guarded(hydra_main)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the boundary's format: a bad argument is one line (and ``--help`` for more), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _int_at_least(minimum: int, rule: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``; ``rule`` says so in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "0 or a positive integer")


def check_output_folder(folder: Path, option: str, error: type[Exception] = UsageError) -> None:
    """Refuse, before any work, an output folder that cannot be created or written (``error``
    names the kind: a command-line option, or a config key)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not writable"
        raise error(f"{option}: cannot write {folder} ({existing} {problem}): choose another folder")


def check_output_file(path: Path, key: str) -> None:
    """Refuse, before any work, an output file that could not be written: a folder at its place,
    a file or an unwritable folder above it."""
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a folder: give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{key}: {path} is not writable: choose another file")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not writable"
        raise ConfigError(f"{key}: cannot write {path} ({existing} {problem}): choose another place")
