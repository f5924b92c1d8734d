"""Shared command-line plumbing for the Hydra entry points.

A user error (a bad config value, missing data, a wrong checkpoint) ends the
command with one line on stderr and exit code 2, no traceback. For a single
run the config is composed and checked *before* Hydra creates the run folder,
so a rejected command writes nothing.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lm.checkpoint import CheckpointError
from lm.config import CONFIG_DIR, ConfigError, compose
from lm.data import DataError
from lm.faults import NonFiniteError, TrainingInterrupted

EXIT_USER_ERROR = 2
EXIT_NUMERICAL_FAULT = 3


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that end a command with one line (exit code 2, 3 or 128 + signal), no traceback."""
    return (ConfigError, DataError, CheckpointError, HydraException, OmegaConfBaseException, NonFiniteError, TrainingInterrupted)


def one_line(err: BaseException) -> str:
    """The error and its cause squeezed onto one line."""
    parts = [str(err)]
    if getattr(err, "override", None):  # Hydra's OverrideParseException: name the override
        parts.insert(0, f"cannot parse override {err.override!r}:")
    cause = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    if cause is not None and str(cause) and str(cause) not in parts[0]:
        parts.append(str(cause).splitlines()[0])
    text = " ".join(" ".join(parts).split())
    return text if len(text) <= 400 else text[:397] + "..."


def die(err: BaseException, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(code)


def exit_for(err: BaseException) -> None:
    """End the command for a run-time stop: a signal (128 + signum) or a numerical fault (3)."""
    if isinstance(err, TrainingInterrupted):
        print(str(err), file=sys.stderr)
        raise SystemExit(err.exit_code)
    if isinstance(err, NonFiniteError):
        die(err, EXIT_NUMERICAL_FAULT)
    die(err)


def exit_on_user_error(task: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Wrap a Hydra task so that a user error exits at once (Hydra would add its own lines)."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except user_errors() as err:
            exit_for(err)

    return wrapper


def run_hydra(task: Callable[[DictConfig], None], config_name: str, preflight: Callable[[DictConfig], None] | None = None) -> None:
    """The whole entry point of a command: ``task(cfg)`` under ``@hydra.main`` with ``configs/<config_name>.yaml``."""
    main = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(exit_on_user_error(task))
    run_app(main, config_name, preflight)


def run_app(hydra_main: Callable[[], None], config_name: str, preflight: Callable[[DictConfig], None] | None = None) -> None:
    """Run a ``@hydra.main`` function, turning user errors into one line and exit code 2."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let errors reach us instead of Hydra's printer
    args = sys.argv[1:]
    errors = user_errors()
    if preflight is not None and not any(a.startswith("-") for a in args):
        try:
            preflight(compose(config_name, args, return_hydra_config=True))
        except errors as err:
            die(err)
    try:
        hydra_main()
    except errors as err:
        exit_for(err)
