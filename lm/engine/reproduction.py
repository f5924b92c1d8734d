"""Every row of Table 1 as a plan of steps (train, average, evaluate), run by ``python -m lm.reproduce``.

The paper's rows need many runs: 10 small models (single and averages of 2, 5 and 10),
3 medium (mean ± std, averages of 2 and 3), a large one, and Gal & Ghahramani's
variational medium model (standard and Monte Carlo dropout evaluation); ``--parts
placement`` adds the paper's argument at the medium size (its recipe with a fresh dropout
mask on h_{t-1} as well, and with no dropout), beside the medium row's seed 1, and ``--parts gru``
the small and medium recipes with a GRU in place of the LSTM. This command
plans them as steps (train, average, evaluate), runs the steps whose inputs are ready,
``--jobs`` at a time, and prints the table of what is done. Each step is skipped when
its result file exists and continues from its checkpoint when it does not
(``trainer.resume=auto``), so the same command picks up after a stop, a crash or a
new session, however often. A stop signal is passed to the running steps, which
checkpoint, and ends the command with 128 + signal. ``--estimate`` times a few windows of
each step here and prints the hours the plan would take (``lm.engine.estimate``).
"""

from __future__ import annotations

import ctypes
import fnmatch
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from lm.config import compose, validate
from lm.engine.estimate import Stopwatch, Work, estimate_plan, format_estimate, native_bf16
from lm.engine.runtime import select_device
from lm.infra.checkpoint import RunFolderLock
from lm.infra.cli import quote_paths
from lm.infra.errors import UsageError
from lm.infra.faults import TrainingInterrupted
from lm.infra.outputs import check_output_folder

PARTS = ("small", "medium", "large", "gal", "placement", "gru")
# Table 1's rows. The placements and the GRU are not in it (two medium trainings each, the GRU a small
# one too): asked for by name.
GRU_EXPERIMENTS = ("gru_small", "gru_medium")  # the paper's small and medium recipes with model.cell=gru
DEFAULT_PARTS = ("small", "medium", "large", "gal")
# The placement part: the medium recipe with dropout moved (name: overrides), compared with the medium row's seed 1.
PLACEMENTS = {
    "recurrent": ("model.dropout_variant=recurrent", "model.dropout_recurrent=0.5"),  # also a fresh mask on h_{t-1} every step
    "none": ("model.dropout_variant=none",),
}
# The paper's model averages per experiment (Table 1), capped by the models trained.
AVERAGE_SIZES = {"zaremba_small": (2, 5, 10), "zaremba_medium": (2, 3)}
POLL_SECONDS = 1.0
# The training keys each step sets itself (--train-arg may not).
SET_HERE = ("experiment", "trainer.seed", "trainer.resume", "trainer.threads", "trainer.progress", "hydra.run.dir")


@dataclass(frozen=True)
class Report:
    """How the plan's results become a table: ``claim(root)`` refuses, before any work, a table that
    would replace a file the report did not write; ``write(root)`` writes it and returns its text."""

    claim: Callable[[Path], None]
    write: Callable[[Path], str]


@dataclass
class Step:
    """One command of the plan: done when ``result`` exists; runs once every step it ``needs`` is done."""

    name: str
    command: list[str]
    result: Path
    threads_arg: str  # how the command takes its thread count, e.g. "trainer.threads={}"
    needs: list[str] = field(default_factory=list)
    resumable: bool = False  # a training: a checkpoint in its folder is continued
    work: Work | None = None  # what it computes, for --estimate

    @property
    def done(self) -> bool:
        return self.result.is_file()


def _train(root: Path, experiment: str, seed: int, extra: list[str], placement: str | None = None) -> Step:
    """A training of ``experiment``, or of the medium recipe with the dropout of ``placement``."""
    label, changes = (f"placement {placement}", PLACEMENTS[placement]) if placement else (experiment, ())
    folder = root / label.replace(" ", "/") / f"seed-{seed}"
    own = [f"experiment={experiment}", *changes, f"trainer.seed={seed}", "trainer.resume=auto", "trainer.progress=false"]
    return Step(
        f"train {label} seed {seed}",
        [sys.executable, "-m", "lm.train", *own, f"hydra.run.dir={folder}", *extra],
        folder / "metrics.json",
        "trainer.threads={}",
        resumable=True,
        work=Work("train", (*own, *extra)),
    )


def plan(
    root: Path,
    parts: list[str],
    small_models: int,
    medium_models: int,
    mc_samples: int,
    extra: list[str],
    data_dir: str | None = None,
) -> list[Step]:
    """The steps for ``parts``, members before their averages, the variational run before its MC evaluation.
    ``data_dir`` is the corpus folder for every step (default: each command's own, for PTB $LM_DATA_DIR or data/ptb)."""
    if data_dir is not None:
        extra = [*extra, f"data.dir={data_dir}"]
    corpus = (
        {"ensemble": ["--data-dir", data_dir], "evaluate": [f"data_dir={data_dir}"]}
        if data_dir
        else {"ensemble": [], "evaluate": []}
    )
    steps: list[Step] = []
    counts = {
        "small": ("zaremba_small", small_models),
        "medium": ("zaremba_medium", medium_models),
        "large": ("zaremba_large", 1),
        "gal": ("gal_medium", 1),
    }
    for part in parts:
        if part == "placement":
            steps += [_train(root, "zaremba_medium", 1, extra, placement) for placement in PLACEMENTS]
            continue
        if part == "gru":
            steps += [_train(root, experiment, 1, extra) for experiment in GRU_EXPERIMENTS]
            continue
        experiment, n = counts[part]
        members = [_train(root, experiment, seed, extra) for seed in range(1, n + 1)]
        steps += members
        for size in (s for s in AVERAGE_SIZES.get(experiment, ()) if s <= n):
            out = root / experiment / f"average-{size}"
            steps.append(
                Step(
                    f"average {size} {experiment} models",
                    [
                        sys.executable,
                        "-m",
                        "lm.ensemble",
                        *(str(m.result.parent / "checkpoint.pt") for m in members[:size]),
                        "--out",
                        str(out),
                        "--no-members",
                        *corpus["ensemble"],
                    ],
                    out / "ensemble.json",
                    "--threads={}",
                    needs=[m.name for m in members[:size]],
                    work=Work("average", members[0].work.overrides, models=size),
                )
            )
        if part == "gal":
            run = members[0].result.parent
            steps.append(
                Step(
                    "evaluate gal_medium seed 1 with Monte Carlo dropout",
                    [
                        sys.executable,
                        "-m",
                        "lm.evaluate",
                        f"checkpoint={run / 'checkpoint.pt'}",
                        f"eval.mc_samples={mc_samples}",
                        f"output={run / 'eval.json'}",
                        *corpus["evaluate"],
                    ],
                    run / "eval.json",
                    "threads={}",
                    needs=[members[0].name],
                    work=Work("evaluate", members[0].work.overrides, mc_samples=mc_samples),
                )
            )
    return steps


def select(steps: list[Step], patterns: list[str] | None) -> list[Step]:
    """The steps whose whole name (as ``--dry-run`` prints it) matches one of the shell-style
    ``patterns``, e.g. ``'train zaremba_medium *'`` or ``'average*'``; every step without patterns.
    A pattern that matches no step is refused."""
    if not patterns:
        return steps
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in steps):
            raise UsageError(
                f"--only {pattern!r} matches no step of this plan: give a step's name as --dry-run lists it, "
                f"'*' for any text (e.g. 'train zaremba_medium *')"
            )
    return [s for s in steps if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def runnable(chosen: list[Step], steps: list[Step]) -> list[Step]:
    """``chosen`` with the steps they need that are done (which run no more); a needed step neither
    done nor chosen is refused, as the steps that need it could never start."""
    names = {s.name for s in chosen}
    done = []
    for step in chosen:
        for need in (n for n in step.needs if n not in names):
            needed = next(s for s in steps if s.name == need)
            if not needed.done:
                raise UsageError(f"--only: {step.name!r} needs {need!r}, which is neither done nor selected: select it too")
            names.add(need)
            done.append(needed)
    return done + chosen


def status(step: Step, steps: dict[str, Step]) -> str:
    """Where a step stands, in words."""
    waits = [n for n in step.needs if not steps[n].done]
    if step.done:
        return "done"
    if waits:
        return f"waits for {len(waits)} of the {len(step.needs)} run(s) it needs"
    if step.resumable and (step.result.parent / "checkpoint.pt").is_file():
        return "continues from its checkpoint"
    return "to run"


@dataclass
class Running:
    step: Step
    process: subprocess.Popen
    log: object
    started: float
    cores: tuple[int, ...]  # the cores it is pinned to (empty: not pinned)


def core_sets(jobs: int, threads: int) -> list[tuple[int, ...]]:
    """One set of ``threads`` cores per job, disjoint, from the cores this process may use; [] where
    there are too few of them or no way to pin (not Linux). Pinned, a job's threads never share a
    core with another job's (measured on 2 cores: a 2-thread training that shares them with any
    other process trains at about half its rate)."""
    if jobs < 2 or not hasattr(os, "sched_setaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < jobs * threads:
        return []
    return [tuple(cores[k * threads : (k + 1) * threads]) for k in range(jobs)]


def execute(steps: list[Step], jobs: int, threads: int, logs: Path) -> list[str]:
    """Run the steps not yet done, ``jobs`` at a time, each with ``threads`` torch threads on cores of
    its own (``core_sets``); returns the names of the steps that failed (after a failure no new step
    starts, the running ones finish). A stop signal is passed to the running steps (they
    checkpoint), then raised as ``TrainingInterrupted``."""
    by_name = {s.name: s for s in steps}
    free = core_sets(jobs, threads)
    todo = [s for s in steps if not s.done]
    running: list[Running] = []
    failed: list[str] = []
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while todo or running:
            if stop:
                for r in running:
                    r.process.send_signal(signal.SIGTERM)  # each training checkpoints, then exits
                for r in running:
                    r.process.wait()
                    r.log.close()
                raise TrainingInterrupted(
                    stop[0],
                    f"stopped by {signal.Signals(stop[0]).name}; the same command continues "
                    f"({len(running)} step(s) checkpointed)",
                )
            for r in list(running):
                code = r.process.poll()
                if code is None:
                    continue
                running.remove(r)
                r.log.close()
                if r.cores:
                    free.append(r.cores)
                minutes = (time.perf_counter() - r.started) / 60
                if code == 0 and r.step.done:
                    print(f"done: {r.step.name} ({minutes:.1f} min)", flush=True)
                else:
                    failed.append(r.step.name)
                    print(f"failed: {r.step.name} (exit {code}); its log: {logs / _log_name(r.step)}", flush=True)
            ready = [s for s in todo if all(by_name[n].done for n in s.needs)]
            while ready and len(running) < jobs and not failed:
                step = ready.pop(0)
                todo.remove(step)
                running.append(_start(step, threads, logs, free.pop(0) if free else ()))
            if not running and (failed or not ready):
                break  # nothing runs, and nothing more may start
            time.sleep(POLL_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return failed


def _log_name(step: Step) -> str:
    return step.name.replace(" ", "_") + ".log"


def _start(step: Step, threads: int, logs: Path, cores: tuple[int, ...] = ()) -> Running:
    command = [*step.command, step.threads_arg.format(threads)]
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / _log_name(step), "a")
    where = f", core{'s' if len(cores) > 1 else ''} {','.join(map(str, cores))}" if cores else ""
    print(f"start: {step.name} ({threads} thread{'s' if threads > 1 else ''}{where})", flush=True)
    # its own session: a terminal's Ctrl-C reaches this command only, which passes SIGTERM on once
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=functools.partial(_in_child, cores) if sys.platform == "linux" else None,
    )
    return Running(step, process, log, time.perf_counter(), cores)


def _in_child(cores: tuple[int, ...]) -> None:
    """In the child, before it runs: pinned to its cores, if any; and SIGTERM (checkpoint and exit)
    when this command dies, even by SIGKILL, so that no training runs on unwatched, holding its
    folder's lock (Linux's prctl)."""
    if cores:
        os.sched_setaffinity(0, cores)
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def reproduce(
    root: Path,
    parts: list[str],
    jobs: int,
    small_models: int,
    medium_models: int,
    mc_samples: int,
    extra: list[str],
    data_dir: str | None = None,
    dry_run: bool = False,
    only: list[str] | None = None,
    estimate: bool = False,
    report: Report | None = None,
) -> int:
    """Plan, run what is left, print the table; 0 when every step is done, 1 when one failed. One
    command at a time per ``root`` (a second one is refused in one line). ``only``: the steps
    whose names match these patterns (``select``); ``estimate``: print the hours the steps would
    take here instead (``lm.engine.estimate``), run nothing. ``report`` writes the table of the
    results under ``root`` (the command passes lm.reporting's) and is checked before any work."""
    check_output_folder(root, "--root")
    if report is not None:
        report.claim(root)  # the table it ends with replaces no README.md or plot that the report did not write
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"--data-dir: {data_dir} is not a folder: give the corpus folder (for PTB, the one with ptb.train.txt)")
    steps = plan(root, parts, small_models, medium_models, mc_samples, extra, data_dir)
    chosen = select(steps, only)
    if estimate:
        return _estimate(root, chosen, jobs)
    if dry_run:
        return _show_plan(root, chosen, jobs, steps)
    chosen = runnable(chosen, steps)
    with RunFolderLock(root):
        return _run_plan(root, chosen, jobs, report)


def _estimate(root: Path, steps: list[Step], jobs: int) -> int:
    threads = _threads(jobs)
    print(
        f"estimate of {len(steps)} steps in {root} ({sum(s.done for s in steps)} done): each shape timed for a few seconds "
        f"with {threads} thread(s)",
        flush=True,
    )
    stopwatch = Stopwatch(threads, say=lambda line: print(f"  {line}", flush=True))
    print(format_estimate(estimate_plan(steps, jobs, threads, stopwatch)))
    return 0


def _show_plan(root: Path, steps: list[Step], jobs: int, plan_steps: list[Step] | None = None) -> int:
    """The steps and where each stands (``plan_steps``: the whole plan, where ``steps`` is a selection)."""
    by_name = {s.name: s for s in plan_steps or steps}
    print(f"{len(steps)} steps in {root} ({sum(s.done for s in steps)} done); {jobs} at a time, {_threads(jobs)} thread(s) each")
    for step in steps:
        print(f"  {step.name}: {status(step, by_name)}")
    return 0


def _threads(jobs: int) -> int:
    """Each step's share of the cores this process may use (``taskset`` and cgroups included)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def _run_plan(root: Path, steps: list[Step], jobs: int, report: Report | None = None) -> int:
    """The steps left, then the table; 0 when every step is done, 1 otherwise."""
    _show_plan(root, steps, jobs)
    failed = execute(steps, jobs, _threads(jobs), root / "logs")
    if report is not None:
        print(report.write(root))
    left = [s.name for s in steps if not s.done]
    if left:
        print(
            f"not done: {', '.join(left)}" + (f" (failed: {', '.join(failed)}; logs in {root / 'logs'})" if failed else ""),
            file=sys.stderr,
        )
        return 1
    return 0


def bf16_where_native(train_args: list[str]) -> list[str]:
    """The override of ``--bf16-where-native``: bf16 where the trainings' device multiplies it natively
    (said in a line either way)."""
    keys = {arg.split("=", 1)[0].lstrip("+~"): arg.split("=", 1)[1] for arg in train_args}
    if "trainer.precision" in keys:
        raise UsageError("--bf16-where-native and --train-arg trainer.precision=...: give one of them")
    native = native_bf16(select_device(keys.get("trainer.device", "auto"), "--train-arg trainer.device"))
    if native is None:
        print("--bf16-where-native: bf16 would be emulated here (no AVX512-BF16, AMX or Arm BF16): each recipe's precision")
        return []
    print(f"--bf16-where-native: bf16 is native here ({native}): every training in bf16")
    return ["trainer.precision=bf16"]


def check_train_args(parts: list[str], extra: list[str], data_dir: str | None) -> None:
    """Each training's config composed and checked with the --train-arg overrides before the first
    step (a bad one would otherwise surface only in a step's log)."""
    experiments = {"small": "zaremba_small", "medium": "zaremba_medium", "large": "zaremba_large", "gal": "gal_medium"}
    data = [f"data.dir={data_dir}"] if data_dir else []
    trainings = [[f"experiment={experiments[part]}"] for part in parts if part in experiments]
    if "placement" in parts:
        trainings += [["experiment=zaremba_medium", *changes] for changes in PLACEMENTS.values()]
    if "gru" in parts:
        trainings += [[f"experiment={experiment}"] for experiment in GRU_EXPERIMENTS]
    for own in trainings:
        try:
            cfg = compose("train", quote_paths([*own, *extra, *data]), return_hydra_config=True)
            validate({key: cfg[key] for key in cfg if key != "hydra"})
        except (ValueError, HydraException, OmegaConfBaseException) as err:
            raise UsageError(f"--train-arg: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
