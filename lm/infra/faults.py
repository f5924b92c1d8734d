"""Signals and faults: graceful stop on SIGINT/SIGTERM/SIGUSR1, and a test hook.

``StopRequest`` turns the signals a user or a scheduler (SLURM sends SIGTERM or
SIGUSR1 before a time limit) uses to stop a job into a flag the training loop
checks between steps, so that it can write a checkpoint and exit cleanly. A
second Ctrl-C stops at once.

``fault_point`` lets the crash-safety tests kill the process at an exact place:
``LM_FAULT=<point>:<index>:<KILL|TERM|INT>`` sends that signal to the process
itself when training reaches the point (``step`` N, ``checkpoint`` or ``eval``
of epoch N, ``final`` 1: the final evaluation). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import NoReturn

FAULT_ENV = "LM_FAULT"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient norm; the message names the step and epoch."""


def stop_now(signum: int, frame: FrameType | None) -> None:
    """The handler of SIGTERM and SIGUSR1 outside a training loop (installed by ``lm.infra.cli.guarded``):
    the command ends at once, in one line, with 128 + signal, instead of dying silently."""
    raise TrainingInterrupted(signum, f"stopped by {signal.Signals(signum).name}")


class StopRequest:
    """Remembers the first stop signal received while installed."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        # called (in the handler) on a signal while set: where no checkpoint is pending, e.g. the
        # final evaluation, it ends the run at once by raising ``TrainingInterrupted``
        self.on_signal: Callable[[], None] | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
        if self.on_signal is not None:
            self.on_signal()

    def forward(self) -> None:
        """Pass the signal on to the handler installed before ours, if it was a Python one.

        Under submitit (SLURM) that handler requeues the job; call this after the
        checkpoint is written. Python's own Ctrl-C handler is not called.
        """
        previous = self._previous.get(self.signum) if self.signum else None
        if callable(previous) and previous not in (signal.default_int_handler, stop_now):
            previous(self.signum, None)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def fault_point(point: str, index: int) -> None:
    """Test hook: signal this process when ``$LM_FAULT`` names this point."""
    spec = os.environ.get(FAULT_ENV)
    if spec is None:
        return
    name, _, rest = spec.partition(":")
    at, _, sig = rest.partition(":")
    if name == point and at == str(index):
        os.kill(os.getpid(), getattr(signal, "SIG" + (sig or "KILL")))


def interrupt(stop: StopRequest, where: str, checkpoint: Path) -> NoReturn:
    """The one way a stop signal ends training: after the checkpoint, pass the signal on and raise."""
    stop.forward()
    raise TrainingInterrupted(
        stop.signum or signal.SIGTERM,
        (
            f"stopped by {stop.name or 'another rank'} {where}; checkpoint {checkpoint}. "
            f"Resume with the same command plus trainer.resume=auto"
        ),
    )
