"""How long ``python -m lm.reproduce``'s plan would take on this machine (``--estimate``).

Nothing here re-implements a step: for each distinct training config of the plan (the seeds
of a recipe share one) the real model is built from the composed config and trained for a few
windows of the real shape (batch, BPTT length, vocabulary size; token ids drawn at random, which
costs the same as text) by the real epoch loop, ``lm.engine.step.train_epoch``, in the precision its
run will use, after a warm-up. The evaluations are timed the same way with
``lm.engine.evaluation.evaluate_mixture`` at the shapes each command uses: the batched validation after
every epoch, valid and test under both protocols at the end (the one-stream protocol runs at
batch 1), the model averages of ``lm.ensemble`` and the Monte Carlo dropout of ``lm.evaluate``.
Each shape is timed once and shared by every row that has it.

The means of those timings, in seconds per predicted token, are projected onto the corpus's
split sizes (counted from its files, else PTB's published counts) and the config's epochs:

    training  = epochs x (train tokens x train rate + batched valid predictions x batched rate)
              + final valid and test under both protocols + STARTUP_SECONDS
    average   = K / 2 x (valid and test under both protocols, timed with 2 members) + STARTUP_SECONDS
    MC        = the standard evaluation + the same with K samples at once + STARTUP_SECONDS

The timings share TIMING_SECONDS (their budgets shrink alike where they would not fit); where
bf16 is native and a training left is fp32, its bf16 step is timed last, if time is left, to say
what ``--bf16-where-native`` would save. A projection of a few windows cannot see what the
machine will do over hours: it says what this machine does now, and flags each timing during
which other processes took the cores it ran on (on 2 shared cores, a busy neighbour made the
2-thread step up to 4x slower).
"""

from __future__ import annotations

import functools
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from lm.config import TrainConfig, compose, validate
from lm.data.batching import batchify, bptt_windows
from lm.data.corpora import PTB, SPLITS, corpus_layout, layout_in
from lm.engine.evaluation import evaluate_mixture
from lm.engine.runtime import fp32_products, select_device
from lm.engine.step import EpochLoop, StepOptions, train_epoch
from lm.infra.errors import DataError
from lm.kernels import cpu_info
from lm.model.language_model import LanguageModel

# Mikolov's PTB (PAPER.md): tokens with <eos> per split and the vocabulary, where its files are not here.
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}
PTB_VOCAB = 10_000
# Not timed: a command's start (imports, corpus, checkpoints loaded) and a training's checkpoint per
# epoch. The committed small runs spent 25-35 s outside their epochs and validations, nearly all of it in
# the final evaluation that the projection times; this is the rest.
STARTUP_SECONDS = 5.0

# How long each shape is timed: after WARMUP_WINDOWS (one where the first alone took a whole
# budget, e.g. emulated bf16), windows until their time reaches the budget (at least one).
WARMUP_WINDOWS = 2
TRAIN_SECONDS = 4.0
TRAIN_WINDOWS = 40
EVAL_SECONDS = 1.5
EVAL_WINDOWS = 20
# All the timings together: the budgets shrink alike where they would not fit (the warm-up, the
# model's construction and at least one window are on top of a budget: SETUP_SECONDS is their
# allowance in the sharing). Leaves the command under 3 minutes on 2 busy cores.
TIMING_SECONDS = 110.0
SETUP_SECONDS = 1.5
# A timed evaluation window holds at most this many predictions: a longer window (Monte Carlo
# dropout tiles the batch K times: 2,000 rows of 35 tokens for the medium model) is timed shorter,
# as at that batch the cost per token does not depend on the window's length.
EVAL_TOKENS = 16_384
AVERAGE_TIMED_MEMBERS = 2  # an average of K is timed with 2 members and scaled: members run one after another
# A timing during which other processes (or the hypervisor) took more than this share of the cores
# it ran on is flagged: on 2 shared cores one busy neighbour made a 2-thread step 4x slower.
BUSY_SHARE = 0.10


@dataclass(frozen=True)
class Work:
    """What a step of the plan computes, in the terms the estimate times (``lm.reproduce`` says it)."""

    kind: str  # "train", "average" or "evaluate"
    overrides: tuple[str, ...]  # the training config: of the run, or of the models read (a member's)
    models: int = 1  # models averaged
    mc_samples: int = 0  # Monte Carlo dropout samples, evaluated after the standard evaluation


class PlannedStep(Protocol):
    name: str
    needs: list[str]
    work: Work | None

    @property
    def done(self) -> bool: ...


@dataclass(frozen=True)
class CorpusSizes:
    vocab: int
    tokens: dict[str, int]  # per split, with <eos>
    source: str  # where the counts come from, in words


# ---------------------------------------------------------------- the arithmetic


def batched_predictions(tokens: int, batch_size: int) -> int:
    """Predictions of the batched protocol (and of one training epoch): every column of the
    ``batch_size`` streams but the first is a target once (``lm.data.bptt_windows``)."""
    return batch_size * (tokens // batch_size - 1)


def final_evaluation_seconds(sizes: CorpusSizes, batch_size: int, batched: float, stream: float) -> float:
    """Valid and test under both protocols (``lm.evaluate.evaluate_all``), at ``batched`` and ``stream``
    seconds per prediction; the stream predicts every token after the first."""
    return sum(
        batched_predictions(sizes.tokens[s], batch_size) * batched + (sizes.tokens[s] - 1) * stream for s in ("valid", "test")
    )


def training_seconds(cfg: TrainConfig, sizes: CorpusSizes, train: float, batched: float, stream: float) -> float:
    """One run of ``cfg`` (``lm.train``): its epochs (or ``trainer.max_steps``) at ``train`` seconds per
    training token, a batched validation after each at ``batched`` seconds per prediction, the final
    evaluation, and the start."""
    per_epoch = batched_predictions(sizes.tokens["train"], cfg.data.batch_size)
    windows = math.ceil(per_epoch / cfg.data.batch_size / cfg.data.bptt)
    epochs, trained = cfg.trainer.epochs, float(cfg.trainer.epochs)
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps < epochs * windows:
        trained = cfg.trainer.max_steps / windows
        epochs = math.ceil(trained)
    valid = batched_predictions(sizes.tokens["valid"], cfg.data.batch_size)
    return (
        trained * per_epoch * train
        + epochs * valid * batched
        + final_evaluation_seconds(sizes, cfg.data.batch_size, batched, stream)
        + STARTUP_SECONDS
    )


def average_seconds(models: int, sizes: CorpusSizes, batch_size: int, batched: float, stream: float) -> float:
    """An average of ``models`` (``lm.ensemble --no-members``), from rates timed with
    ``AVERAGE_TIMED_MEMBERS`` members: the members' forward passes run one after another."""
    scale = models / AVERAGE_TIMED_MEMBERS
    return scale * final_evaluation_seconds(sizes, batch_size, batched, stream) + STARTUP_SECONDS


def plan_wall_seconds(steps: Sequence[PlannedStep], seconds: dict[str, float], jobs: int) -> float:
    """Wall time of the steps not done, run as ``lm.reproduce.execute`` runs them: in the plan's
    order, ``jobs`` at a time, each once the steps it needs are done (a need outside ``steps`` is done)."""
    names = {s.name for s in steps}
    finished: dict[str, float] = {s.name: 0.0 for s in steps if s.done}
    todo = [s for s in steps if not s.done]
    running: list[tuple[float, str]] = []
    now = 0.0
    while todo or running:
        ready = [s for s in todo if all(n not in names or finished.get(n, math.inf) <= now for n in s.needs)]
        while ready and len(running) < jobs:
            step = ready.pop(0)
            todo.remove(step)
            running.append((now + seconds[step.name], step.name))
        if not running:
            break  # what is left waits for a step that never ends
        running.sort()
        now, name = running.pop(0)
        finished[name] = now
    return now


# ---------------------------------------------------------------- the corpus


@functools.cache
def corpus_sizes(folder: Path, is_ptb: bool) -> CorpusSizes:
    """Tokens per split (whitespace words plus one ``<eos>`` a line, as ``lm.data`` reads them) and
    the vocabulary (train's words), counted from the files in ``folder``; PTB's published counts
    where its files are not there (a custom corpus has to be)."""
    files = layout_in(folder).files(folder)
    if not all(f.is_file() for f in files.values()):
        if is_ptb:
            return CorpusSizes(PTB_VOCAB, dict(PTB_TOKENS), f"PTB's published counts (no corpus files in {folder})")
        raise DataError(f"no corpus files in {folder}: give the corpus folder with --data-dir")
    tokens, vocab = {}, set()
    for split, file in files.items():
        lines = file.read_text(encoding="utf-8").splitlines()
        tokens[split] = sum(len(line.split()) for line in lines) + len(lines)
        if split == "train":
            vocab = {word for line in lines for word in line.split()} | {"<eos>"}
    return CorpusSizes(len(vocab), tokens, f"counted in {folder}")


def sizes_for(cfg: TrainConfig) -> CorpusSizes:
    """The corpus a run of ``cfg`` reads (for PTB ``$LM_DATA_DIR`` first, as ``lm.train`` does)."""
    layout = corpus_layout(cfg.data.name)
    return corpus_sizes(layout.folder(cfg.data.dir), layout is PTB)


# ---------------------------------------------------------------- the timings


def native_bf16(device: torch.device) -> str | None:
    """What multiplies bf16 natively on ``device`` (e.g. ``AVX512-BF16``, ``AMX``, a GPU's name),
    or None where bf16 would be emulated (tens of times slower than fp32 on an AVX2 CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_bf16_supported(including_emulation=False) else None
    bf16 = cpu_info()["bf16"]
    return None if bf16 == "none" else bf16


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine since boot, the hypervisor's steal included; this
    process's CPU seconds), from /proc/stat; None where it cannot be read (not Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _taken_share(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float, threads: int) -> float:
    """The share of ``threads`` cores that other processes took between two ``_cpu_seconds``: what
    they used beyond the cores a timing at ``threads`` threads leaves free (the other step's core
    at --jobs 2 is such a core)."""
    if before is None or after is None or wall <= 0:
        return 0.0
    others = ((after[0] - before[0]) - (after[1] - before[1])) / wall  # cores, on average
    spare = (os.cpu_count() or 1) - threads
    return max(0.0, others - spare) / threads


def _mean_after_warmup(stamps: list[float], budget: float) -> tuple[float, int]:
    """(mean seconds of the timed windows, how many) from the clock read before the first window
    and after each: the warm-up windows left out (``_warmup``). The mean, not the median: a long
    run pays for its occasional slow window too (800 windows of the small step: 40-window medians
    were 4% faster than the whole, 40-window means matched it)."""
    warm = _warmup(stamps, budget)
    return (stamps[-1] - stamps[warm]) / (len(stamps) - 1 - warm), len(stamps) - 1 - warm


def _warmup(stamps: list[float], budget: float) -> int:
    """Windows left out: ``WARMUP_WINDOWS``, or the first alone where it took the whole ``budget``."""
    slow = len(stamps) > 1 and stamps[1] - stamps[0] >= budget
    return 1 if slow else WARMUP_WINDOWS


def _enough(stamps: list[float], budget: float, most: int) -> bool:
    """Whether the windows timed so far (``stamps`` as in ``_mean_after_warmup``) are enough."""
    warm = _warmup(stamps, budget)
    timed = len(stamps) - 1 - warm
    return timed >= 1 and (timed >= most or stamps[-1] - stamps[warm] >= budget)


@dataclass
class Timing:
    label: str
    measure: Callable[[float], tuple[float, int, int]]  # budget -> (mean seconds a window, windows timed, tokens a window)
    budget: float
    optional: bool  # timed only where the time left allows


class Stopwatch:
    """Seconds per predicted token of the real training step and evaluation at ``threads`` torch
    threads; each shape timed once. A shape asked for is pending (its rate NaN) until
    ``time_pending`` times them all within ``seconds``. ``say`` gets a line per timing."""

    def __init__(self, threads: int, say: Callable[[str], None] = lambda line: None, seconds: float | None = None):
        self.threads = threads
        self.say = say
        self.total = TIMING_SECONDS if seconds is None else seconds
        self.optional = False  # shapes asked for meanwhile are timed only if time is left
        self.seconds = 0.0  # spent timing
        self.busy: list[str] = []  # the timings during which other processes took more than BUSY_SHARE of the cores
        self.pending: dict[tuple, Timing] = {}
        self._done: dict[tuple, float] = {}

    def _rate(self, key: tuple, label: str, measure: Callable[[float], tuple[float, int, int]], budget: float) -> float:
        if key in self._done:
            return self._done[key]
        if key not in self.pending or not self.optional:
            self.pending[key] = Timing(label, measure, budget, self.optional)
        return math.nan

    def time_pending(self) -> None:
        """Time every pending shape, the optional ones last, in ``self.total`` seconds in all: each gets
        its budget, all shrunk alike where they would not fit; an optional one that would get less
        than half of its budget stays untimed (its rate NaN)."""
        start = time.perf_counter()
        queue = sorted(self.pending.items(), key=lambda item: item[1].optional)
        for index, (key, timing) in enumerate(queue):
            left = self.total - (time.perf_counter() - start)
            wanted = sum(t.budget + SETUP_SECONDS for _, t in queue[index:] if not t.optional or timing.optional)
            scale = min(1.0, max(left, 0.0) / wanted)
            if timing.optional and scale < 0.5:
                continue
            self._time(key, timing, timing.budget * scale)
        self.pending = {key: t for key, t in self.pending.items() if key not in self._done}

    def _time(self, key: tuple, timing: Timing, budget: float) -> None:
        threads, start, cpu = torch.get_num_threads(), time.perf_counter(), _cpu_seconds()
        torch.set_num_threads(self.threads)
        try:
            seconds, windows, tokens = timing.measure(budget)
        finally:
            torch.set_num_threads(threads)
            wall = time.perf_counter() - start
            self.seconds += wall
        self._done[key] = seconds / tokens
        taken = _taken_share(cpu, _cpu_seconds(), wall, self.threads)
        busy = f"; other processes took {taken:.0%} of its cores meanwhile: too slow" if taken > BUSY_SHARE else ""
        if busy:
            self.busy.append(timing.label)
        self.say(
            f"timed {timing.label}: {tokens / seconds:,.0f} tokens/s (mean of {windows} window(s) of {tokens:,} tokens){busy}"
        )

    def train(self, cfg: TrainConfig, vocab: int) -> float:
        """Seconds per training token of ``cfg``'s step (``lm.engine.step.train_epoch``, as ``lm.train`` sets it up)."""
        variant = "" if cfg.model.dropout_variant == "zaremba" else f", dropout_variant {cfg.model.dropout_variant}"
        shape = f"hidden {cfg.model.hidden_size}, {cfg.data.batch_size}x{cfg.data.bptt}"
        label = f"train {cfg.name} ({shape}, {cfg.trainer.precision}{variant})"
        t = cfg.trainer  # what the step's cost depends on: not the seed, the lr or the schedule
        key = (
            "train",
            vocab,
            repr(cfg.model),
            cfg.data.batch_size,
            cfg.data.bptt,
            cfg.optim.weight_decay > 0,
            t.precision,
            t.device,
            t.tf32,
            t.nonfinite,
        )
        return self._rate(key, label, lambda budget: self._time_training(cfg, vocab, budget), TRAIN_SECONDS)

    def _time_training(self, cfg: TrainConfig, vocab: int, budget: float) -> tuple[float, int, int]:
        device = select_device(cfg.trainer.device)
        batch, bptt = cfg.data.batch_size, cfg.data.bptt
        torch.manual_seed(cfg.trainer.seed)
        model = LanguageModel.from_config(cfg.model, vocab).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, foreach=True)
        options = StepOptions.from_config(cfg)  # as the training builds them (one process)
        ids = torch.randint(vocab, (batch * (bptt * (WARMUP_WINDOWS + TRAIN_WINDOWS) + 1),))
        windows = bptt_windows(batchify(ids, batch).to(device), bptt)
        stamps = [time.perf_counter()]
        loop = EpochLoop(
            should_stop=lambda: _enough(stamps, budget, TRAIN_WINDOWS),
            log_every=1,
            on_log=lambda *_: stamps.append(time.perf_counter()),
        )  # a host sync per window: each is timed whole
        with fp32_products(cfg.trainer.tf32):
            train_epoch(model, windows, optimizer, options, loop=loop)
        seconds, timed = _mean_after_warmup(stamps, budget)
        return seconds, timed, batch * bptt

    def evaluate(
        self, cfg: TrainConfig, vocab: int, device: torch.device, rows: int, window: int, members: int = 1, mc_samples: int = 0
    ) -> float:
        """Seconds per prediction of ``lm.engine.evaluation.evaluate_mixture`` over ``rows`` streams in windows of
        ``window`` (dropout off), with ``members`` models averaged, or one model's ``mc_samples`` Monte
        Carlo samples (dropout on, the streams tiled ``mc_samples`` times along the batch)."""
        length = min(window, max(1, EVAL_TOKENS // (rows * max(mc_samples, 1))))
        what = f"{members} models averaged" if members > 1 else f"{mc_samples} MC dropout samples" if mc_samples else "evaluation"
        label = f"{what} (hidden {cfg.model.hidden_size}, {rows}x{window}{f', timed at {length}' if length < window else ''})"
        model = (
            cfg.model
            if mc_samples
            else (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.tie_weights, cfg.model.weight_drop > 0)
        )
        key = ("evaluate", vocab, repr(model), rows, length, members, mc_samples, str(device), cfg.trainer.tf32)
        return self._rate(
            key,
            label,
            lambda budget: self._time_evaluation(cfg, vocab, device, rows, length, members, mc_samples, budget),
            EVAL_SECONDS,
        )

    def _time_evaluation(
        self,
        cfg: TrainConfig,
        vocab: int,
        device: torch.device,
        rows: int,
        length: int,
        members: int,
        mc_samples: int,
        budget: float,
    ) -> tuple[float, int, int]:
        torch.manual_seed(0)
        models = [LanguageModel.from_config(cfg.model, vocab).to(device) for _ in range(members)]
        mixture = [models[0]] * mc_samples if mc_samples else models
        data = torch.randint(vocab, (rows, length + 1))
        stamps = [time.perf_counter()]
        with fp32_products(cfg.trainer.tf32):
            while not _enough(stamps, budget, EVAL_WINDOWS):
                evaluate_mixture(mixture, data, length, stochastic=mc_samples > 0)
                stamps.append(time.perf_counter())
        seconds, timed = _mean_after_warmup(stamps, budget)
        return seconds, timed, rows * length


# ---------------------------------------------------------------- the plan's rows


@dataclass
class Row:
    """Steps of one kind and config (the seeds of a recipe), as one line of the table."""

    name: str
    precision: str
    seconds: list[float] = field(default_factory=list)  # per step
    left: float = 0.0  # the steps not done

    @property
    def each_hours(self) -> float:
        return statistics.mean(self.seconds) / 3600

    @property
    def total_hours(self) -> float:
        return sum(self.seconds) / 3600


@dataclass
class Estimate:
    rows: list[Row]
    step_seconds: dict[str, float]  # per step of the plan
    wall_seconds: float  # the steps not done, ``jobs`` at a time
    jobs: int
    threads: int
    device: str
    corpora: list[str]  # a line per corpus read
    timed_seconds: float
    bf16: str | None  # what multiplies bf16 natively here, if anything
    bf16_left_seconds: float | None = None  # the steps not done, with the fp32 trainings in bf16
    fp32_trainings_left: int = 0
    busy: list[str] = field(default_factory=list)  # timings disturbed by other processes (``Stopwatch.busy``)


class Estimator:
    """Seconds of each step of a plan, from the ``Stopwatch``'s rates and the corpus's sizes."""

    def __init__(self, stopwatch: Stopwatch):
        self.stopwatch = stopwatch
        self._configs: dict[tuple[str, ...], TrainConfig] = {}

    def config(self, overrides: tuple[str, ...]) -> TrainConfig:
        """The config a step's command composes (a bad ``--train-arg`` is a ``ConfigError`` here)."""
        if overrides not in self._configs:
            self._configs[overrides] = validate(compose("train", list(overrides)))
        return self._configs[overrides]

    def seconds(self, work: Work) -> float:
        cfg = self.config(work.overrides)
        sizes = sizes_for(cfg)
        watch, vocab, batch = self.stopwatch, sizes.vocab, cfg.data.batch_size
        if work.kind == "train":
            device = select_device(cfg.trainer.device)
            return training_seconds(cfg, sizes, watch.train(cfg, vocab), *self._protocols(cfg, vocab, device))
        device = select_device("auto")  # lm.evaluate's and lm.ensemble's default
        if work.kind == "average":
            rates = self._protocols(cfg, vocab, device, members=AVERAGE_TIMED_MEMBERS)
            return average_seconds(work.models, sizes, batch, *rates)
        if work.kind == "evaluate":
            seconds = final_evaluation_seconds(sizes, batch, *self._protocols(cfg, vocab, device)) + STARTUP_SECONDS
            if work.mc_samples:
                seconds += final_evaluation_seconds(
                    sizes, batch, *self._protocols(cfg, vocab, device, mc_samples=work.mc_samples)
                )
            return seconds
        raise ValueError(f"unknown kind of work {work.kind!r}")

    def _protocols(
        self, cfg: TrainConfig, vocab: int, device: torch.device, members: int = 1, mc_samples: int = 0
    ) -> tuple[float, float]:
        """Seconds per prediction of the batched protocol and of the one-stream protocol."""
        batched = self.stopwatch.evaluate(cfg, vocab, device, cfg.data.batch_size, cfg.data.bptt, members, mc_samples)
        stream = self.stopwatch.evaluate(cfg, vocab, device, 1, cfg.trainer.eval_window, members, mc_samples)
        return batched, stream

    def precision(self, work: Work) -> str:
        """What the step computes in: a training its ``trainer.precision``; every evaluation fp32."""
        return self.config(work.overrides).trainer.precision if work.kind == "train" else "fp32"


def row_name(step_name: str) -> str:
    """The table row of a step: its name without the seed (the seeds of a recipe share a row)."""
    return re.sub(r" seed \d+", "", step_name)


def estimate_plan(steps: Sequence[PlannedStep], jobs: int, threads: int, stopwatch: Stopwatch | None = None) -> Estimate:
    """Projected seconds of every step of ``steps`` (each with its ``work``), grouped into rows; and,
    where bf16 is native and some training left is fp32, of the steps left with those in bf16.
    Two passes: the first asks for every shape, the stopwatch times them, the second projects."""
    stopwatch = stopwatch or Stopwatch(threads)
    estimator = Estimator(stopwatch)
    device = select_device("auto")
    bf16 = native_bf16(device)
    fp32 = [s for s in steps if s.work.kind == "train" and not s.done and estimator.precision(s.work) == "fp32"] if bf16 else []
    alternatives = {s.name: Work("train", (*s.work.overrides, "trainer.precision=bf16")) for s in fp32}
    for step in steps:
        estimator.seconds(step.work)
    stopwatch.optional = True
    for work in alternatives.values():
        estimator.seconds(work)
    stopwatch.optional = False
    stopwatch.time_pending()
    rows: dict[str, Row] = {}
    seconds: dict[str, float] = {}
    for step in steps:
        seconds[step.name] = estimator.seconds(step.work)
        row = rows.setdefault(row_name(step.name), Row(row_name(step.name), estimator.precision(step.work)))
        row.seconds.append(seconds[step.name])
        row.left += 0.0 if step.done else seconds[step.name]
    configs = [estimator.config(s.work.overrides) for s in steps]
    corpora = sorted({_corpus_line(sizes_for(c)) for c in configs})
    result = Estimate(
        list(rows.values()),
        seconds,
        plan_wall_seconds(steps, seconds, jobs),
        jobs,
        threads,
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        corpora,
        0.0,
        bf16,
    )
    if fp32:  # what --bf16-where-native would save
        faster = {name: estimator.seconds(work) for name, work in alternatives.items()}
        result.fp32_trainings_left = len(fp32)
        if not any(math.isnan(v) for v in faster.values()):  # else: no time was left to time them
            result.bf16_left_seconds = sum(r.left for r in result.rows) - sum(seconds[n] for n in faster) + sum(faster.values())
    result.timed_seconds = stopwatch.seconds
    result.busy = list(stopwatch.busy)
    return result


def _corpus_line(sizes: CorpusSizes) -> str:
    counts = ", ".join(f"{s} {sizes.tokens[s]:,}" for s in SPLITS)
    return f"tokens with <eos>: {counts}; vocabulary {sizes.vocab:,} ({sizes.source})"


def format_estimate(result: Estimate) -> str:
    """The table: a row per kind of step, its runs, precision, hours each and in all, and what is left."""
    cpu = cpu_info()
    width = max([len("total"), *(len(r.name) for r in result.rows)])
    lines = [
        f"CPU: {cpu['model']}; bf16 instructions: {cpu['bf16']}" + (f"; GPU: {result.device}" if result.device != "cpu" else ""),
        *(f"corpus: {c}" for c in result.corpora),
        f"each step with {result.threads} thread(s), {result.jobs} at a time",
        "",
        f"{'row':<{width}}  {'runs':>4}  {'precision':<9}  {'h each':>7}  {'h total':>7}  {'h left':>7}",
    ]
    for r in result.rows:
        lines.append(
            f"{r.name:<{width}}  {len(r.seconds):>4}  {r.precision:<9}  "
            f"{r.each_hours:>7.2f}  {r.total_hours:>7.2f}  {r.left / 3600:>7.2f}"
        )
    total, left = sum(r.total_hours for r in result.rows), sum(r.left for r in result.rows) / 3600
    lines.append(
        f"{'total':<{width}}  {sum(len(r.seconds) for r in result.rows):>4}  {'':<9}  {'':>7}  {total:>7.2f}  {left:>7.2f}"
    )
    lines += [
        "",
        f"wall time of what is left at --jobs {result.jobs}: about {result.wall_seconds / 3600:.1f} h "
        f"(steps in the plan's order, each once the runs it needs are done)",
    ]
    if result.bf16_left_seconds is not None:
        lines.append(
            f"bf16 is native here ({result.bf16}): with --bf16-where-native the {result.fp32_trainings_left} fp32 training(s) "
            f"left would train in bf16, about {result.bf16_left_seconds / 3600:.1f} h of steps left instead of {left:.1f} h"
        )
    elif result.fp32_trainings_left:
        lines.append(
            f"bf16 is native here ({result.bf16}): --bf16-where-native would train the {result.fp32_trainings_left} fp32 "
            f"training(s) left in bf16 (not timed: no time was left)"
        )
    lines.append(f"timed in {result.timed_seconds:.0f} s; 'h left' counts a run that continues from its checkpoint in full")
    if result.jobs > 1:
        lines.append(
            f"each shape was timed alone: {result.jobs} steps at once share the memory bandwidth and caches, and may run slower"
        )
    if result.busy:
        lines.append(
            f"warning: other processes took more than {BUSY_SHARE:.0%} of the cores of {len(result.busy)} of the timings "
            f"({', '.join(result.busy)}): the rows that use them are too long; estimate again on an idle machine"
        )
    return "\n".join(lines)
