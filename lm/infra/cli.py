"""The one error boundary of every command (``lm.train``, ``lm.evaluate``, ``lm.ensemble``,
``lm.generate``, ``lm.report``, ``lm.ablation``, ``lm.reproduce``, ``lm.data``).

An expected failure ends the command with one line on stderr and no traceback:

- exit 2: a user error (a bad config value, missing or unreadable data, a wrong
  checkpoint, a run folder that is taken, an OS error on a file: read-only, full disk);
- exit 3: training stopped on a NaN or infinite loss, gradient norm or perplexity;
- exit 128 + signal: stopped by SIGINT, SIGTERM or SIGUSR1 (a checkpoint written when training).

An OS error that a library wrapped in its own exception (``torch.save`` raises a RuntimeError
while handling a full disk's ENOSPC, ``datasets`` a DatasetGenerationError) is found in the
chain and ends the command like a bare one. Anything else is a bug and keeps its traceback. For a
single training run the config is composed and checked *before* Hydra creates the run folder, so
a rejected command writes nothing.

A sweep (``-m``) runs every job whatever an earlier one did: a job's failure is logged (its
train.log and stdout) and the sweep goes on; at the end one line names each failed job with its
exit code, and the sweep exits with the first failed job's code. A stop signal stops the sweep.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lm.config import CONFIG_DIR, SEED_MAX, ConfigError, compose, machine_cores
from lm.infra.checkpoint import CheckpointError, RunFolderError
from lm.infra.errors import DataError, UsageError
from lm.infra.faults import NonFiniteError, TrainingInterrupted, stop_now
from lm.infra.outputs import check_output_file, check_output_folder, os_error_in  # noqa: F401  (commands import them here)
from lm.infra.schema import SchemaError

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
        SchemaError,
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


def exit_code(err: BaseException) -> int:
    """The exit code of an expected failure."""
    if isinstance(err, TrainingInterrupted):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return EXIT_NUMERICAL_FAULT if isinstance(err, NonFiniteError) else EXIT_USER_ERROR


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
    except Exception as err:
        found = os_error_in(err)
        if found is None:
            raise
        die(found)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_on_user_error(task: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Wrap a Hydra task so that a user error exits at once (Hydra would add its own lines)."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> None:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            _sweep_job(task, cfg)
        else:
            guarded(lambda: task(cfg))

    return wrapper


# ---------------------------------------------------------------- sweeps: every job runs, the failed ones named at the end

SWEEP_FAILURES_ENV = "LM_SWEEP_FAILURES"  # a file each failed job appends one JSON line to (jobs may be processes)


def _sweep_job(task: Callable[[DictConfig], None], cfg: DictConfig) -> None:
    """One job of a sweep: a failure is recorded for the sweep's last line, logged, and the next job
    runs (a stop signal still stops the sweep)."""
    try:
        task(cfg)
        return
    except (TrainingInterrupted, KeyboardInterrupt) as err:
        exit_for(err)
    except user_errors() as err:
        code, line = exit_code(err), one_line(err)
    except Exception as err:
        found = os_error_in(err)
        if found is None:
            raise
        code, line = EXIT_USER_ERROR, one_line(found)
    hydra_cfg = HydraConfig.get()
    job = Path(hydra_cfg.runtime.output_dir)
    try:
        job = job.relative_to(Path(hydra_cfg.sweep.dir))
    except ValueError:
        pass
    logging.getLogger("lm.train").error("job %s failed (exit %d): %s", job, code, line)
    record = json.dumps({"job": str(job), "code": code, "error": line}) + "\n"
    path = os.environ.get(SWEEP_FAILURES_ENV)
    if path is None:
        _FAILED_HERE.append(json.loads(record))
        return
    with open(path, "a") as f:  # one short line per write: appends of several processes do not interleave
        f.write(record)


_FAILED_HERE: list[dict] = []  # a sweep's failures when no file was set up (a sweep not started by run_app)


def _run_sweep(hydra_main: Callable[[], None]) -> None:
    """Every job of the sweep, then one line naming each failed job and its exit code."""
    fd, path = tempfile.mkstemp(prefix="lm-sweep-", suffix=".jsonl")
    os.close(fd)
    os.environ[SWEEP_FAILURES_ENV] = path
    try:
        guarded(hydra_main)
        failed = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    finally:
        os.environ.pop(SWEEP_FAILURES_ENV, None)
        Path(path).unlink(missing_ok=True)
    if failed:
        each = "; ".join(f"{f['job']} (exit {f['code']}: {f['error']})" for f in failed)
        print(f"error: {len(failed)} sweep job(s) failed: {each}", file=sys.stderr)
        raise SystemExit(failed[0]["code"])


def _path_tag(value: str) -> str:
    """A folder-name-safe tag for a path: its last component and a short digest of the whole."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(value).name or "root").strip("_") or "path"
    return f"{name}.{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def _sweep_subdir(*keys: str, _root_: DictConfig) -> str:
    """A sweep job's folder when a path key is swept: Hydra's override_dirname (which leaves path
    keys out) and a tag per swept path, so that each path's job has a folder of its own."""
    base = str(_root_.hydra.job.override_dirname)
    tags = [f"{key}-{_path_tag(str(OmegaConf.select(_root_, key)))}" for key in keys]
    return "_".join(part for part in (base, *tags) if part)


if not OmegaConf.has_resolver("lm_sweep_subdir"):  # also in a joblib worker, which imports this module with the task
    OmegaConf.register_new_resolver("lm_sweep_subdir", _sweep_subdir)


# Config keys that hold paths: their values are quoted for Hydra, so that any path works unquoted
# on the command line (a sweep job's folder has '=' and ',' in older runs; a space is fine too).
PATH_KEYS = ("checkpoint", "data_dir", "output", "data.dir", "trainer.resume", "hydra.run.dir", "hydra.sweep.dir")
# The path keys a sweep may sweep (``-m data.dir=a,b``): not the folders Hydra itself writes to.
SWEPT_PATH_KEYS = tuple(key for key in PATH_KEYS if not key.startswith("hydra."))
_SWEEP_FUNCTION = re.compile(r"^(choice|range|interval|glob|sort|shuffle|tag|extend_list)\(")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def quote_paths(args: Sequence[str], keys: Sequence[str] = PATH_KEYS, multirun: bool = False) -> list[str]:
    """``key=value`` for a path key becomes ``key='value'`` (Hydra's quoting), so that Hydra
    reads ``=``, ``,``, spaces and brackets in a path literally. Values already quoted, empty,
    ``null`` or holding an interpolation (``${...}``) are left as they are.

    In a sweep (``multirun``) a path key's value with commas that is not itself an existing path
    is a list of paths to sweep (``data.dir=a,b``: each quoted, ``data.dir='a','b'``); a sweep
    function (``glob(...)``, ``choice(...)``) is left to Hydra."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        if sep and bare in keys and value and value != "null" and value[0] not in "'\"" and "${" not in value:
            if multirun and bare in SWEPT_PATH_KEYS and _SWEEP_FUNCTION.match(value):
                pass
            elif multirun and bare in SWEPT_PATH_KEYS and "," in value and not Path(value).exists():
                arg = f"{key}=" + ",".join(_quote(part) for part in value.split(","))
            else:
                arg = f"{key}={_quote(value)}"
        out.append(arg)
    return out


def swept_path_keys(args: Sequence[str]) -> list[str]:
    """The path keys that ``args`` (after ``quote_paths``) sweep over several values."""
    swept = []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        if sep and bare in SWEPT_PATH_KEYS and (_SWEEP_FUNCTION.match(value) or re.search(r"',\s*'", value)):
            swept.append(bare)
    return swept


def run_hydra(
    task: Callable[[DictConfig], None], config_name: str, preflight: Callable[[DictConfig], None] | None = None
) -> None:
    """The whole entry point of a command: ``task(cfg)`` under ``@hydra.main`` with ``configs/<config_name>.yaml``."""
    main = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(exit_on_user_error(task))
    run_app(main, config_name, preflight)


def run_app(hydra_main: Callable[[], None], config_name: str, preflight: Callable[[DictConfig], None] | None = None) -> None:
    """Run a ``@hydra.main`` function inside the error boundary, after ``preflight`` on the composed config."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let errors reach us instead of Hydra's printer
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    sys.argv[1:] = quote_paths(sys.argv[1:], multirun=multirun)
    args = sys.argv[1:]
    if multirun:
        swept = swept_path_keys(args)
        if swept and config_name == "train" and not any(a.startswith("hydra.sweep.subdir=") for a in args):
            sys.argv.append("hydra.sweep.subdir=${lm_sweep_subdir:" + ",".join(swept) + "}")  # a folder per swept path
        _run_sweep(hydra_main)
        return
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


def seed_int(text: str) -> int:
    """An argparse type: a seed, 0 up to torch's largest (unsigned 64-bit)."""
    value = non_negative_int(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {SEED_MAX} (torch's seeds are unsigned 64-bit), got {value}")
    return value


def thread_count(text: str) -> int:
    """An argparse type: torch threads, 0 (torch's default) up to this machine's cores."""
    value = non_negative_int(text)
    if value > machine_cores():
        raise argparse.ArgumentTypeError(f"must be at most {machine_cores()} (the cores of this machine), got {value}")
    return value
