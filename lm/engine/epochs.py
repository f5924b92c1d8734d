"""The epochs of a run: each trained at its lr (``lm.engine.step.train_epoch``) with a progress bar
and TensorBoard scalars, then validated, recorded and checkpointed; a stop signal ends the loop
after a checkpoint."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import torch

from lm.engine.evaluation import evaluate, perplexity
from lm.engine.run import Run
from lm.engine.run_folder import RUN_FILES, TB_NAME, record_run_files, run_files
from lm.engine.step import EpochLoop, EpochProgress, learning_rate, train_epoch
from lm.infra.faults import NonFiniteError, StopRequest, TrainingInterrupted, fault_point, interrupt
from lm.model.language_model import count_parameters

log = logging.getLogger("lm.train")  # one logger for the whole training run (its train.log)
# Steps between the checks for a stop signal under torchrun: each is an all-reduce with a host
# sync, so a signal takes effect within this many steps (a single process checks every step).
STOP_CHECK_EVERY = 20


def fit(run: Run, stop: StopRequest | None = None) -> None:
    """The epochs left to train, each ending with validation and a checkpoint; a stop signal
    ends the loop after a checkpoint (mid-epoch or at the epoch's end) with ``TrainingInterrupted``,
    also one that came during the last epoch's validation."""
    if stop is None:
        with StopRequest() as own:
            return fit(run, own)
    cfg = run.cfg
    log.info(
        "%s: %s parameters, %d train windows of %dx%d per epoch, device %s, %d threads, %s",
        cfg.name,
        f"{count_parameters(run.model):,}",
        len(run.windows),
        cfg.data.batch_size,
        cfg.data.bptt,
        run.device,
        torch.get_num_threads(),
        cfg.trainer.precision,
    )
    writer = _open_writer(run)
    try:
        for epoch in range(run.epochs_done, cfg.trainer.epochs):
            if run.max_steps_reached():
                break
            progress = _logged_epoch(run, epoch, lambda: run.group.any(bool(stop)), writer)
            stopped = run.group.any(bool(stop))
            mid_epoch = progress.window < len(run.windows)
            if stopped and mid_epoch and run.step == 0:  # stopped while setting up: nothing to keep
                stop.forward()
                raise TrainingInterrupted(
                    stop.signum or signal.SIGTERM,
                    f"stopped by {stop.name or 'another rank'} before the "
                    f"first step; no checkpoint written, the same command starts the run again",
                )
            if stopped and mid_epoch:
                run.save(progress)
                interrupt(stop, f"in epoch {epoch + 1} at step {run.step}", run.checkpoint_path)
            _finish_epoch(run, epoch, progress, writer)
            if run.group.any(bool(stop)):  # before or during this epoch's validation, the last one's too
                interrupt(stop, f"after epoch {epoch + 1}", run.checkpoint_path)
    finally:
        writer.close()


def _open_writer(run: Run) -> Any:
    """TensorBoard's writer into ``<run>/tb`` on rank 0 (a stand-in that drops everything elsewhere),
    and the run's manifest: the files this run writes in its folder, its new event file included."""
    from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard, protobuf): only a training run needs it

    if not run.group.is_main:
        return _NullWriter()
    tb = run.out_dir / TB_NAME
    before = set(tb.iterdir()) if tb.is_dir() else set()
    writer = SummaryWriter(log_dir=str(tb))
    writer.flush()  # the event file exists from here on
    new = sorted(p for p in tb.iterdir() if p not in before)
    earlier = run_files(run.out_dir) if run.resumed_here else []  # a run from before manifests: its own files
    names = [*RUN_FILES, *(p.relative_to(run.out_dir).as_posix() for p in [*earlier, *new])]
    record_run_files(run.out_dir, [name for name in dict.fromkeys(names) if name != "manifest.json"])
    return writer


class _NullWriter:
    """Stands in for TensorBoard's writer on ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _logged_epoch(run: Run, epoch: int, should_stop: Callable[[], bool], writer: Any) -> EpochProgress:
    """Train the 0-based ``epoch`` at its lr, from a resumed position if there is one."""
    from tqdm import tqdm  # optional display; imported with the training loop, not by every user of lm.train

    cfg = run.cfg
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = learning_rate(epoch, cfg.optim)
    progress, run.partial = run.partial or EpochProgress(), None
    remaining = None if cfg.trainer.max_steps is None else cfg.trainer.max_steps - run.step
    todo = len(run.windows) - progress.window
    steps_before = progress.steps

    def on_log(step: int, mean_nll: float, grad_norm: float) -> None:
        writer.add_scalar("train/step_ppl", math.exp(min(mean_nll, 50.0)), step)
        writer.add_scalar("train/grad_norm", grad_norm, step)

    try:
        with tqdm(
            total=min(todo, remaining or todo) * cfg.data.batch_size * cfg.data.bptt,
            unit="w",
            unit_scale=True,
            desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}",
            disable=not (cfg.trainer.progress and run.group.is_main),
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            loop = EpochLoop(
                max_steps=remaining,
                should_stop=should_stop,
                stop_every=STOP_CHECK_EVERY if run.group.active else 1,
                epoch=epoch + 1,
                step_offset=run.step,
                log_every=cfg.trainer.log_every,
                on_log=on_log,
                bar=bar,
            )
            progress = train_epoch(run.model, run.windows, run.optimizer, run.step_options, progress, loop)
    except NonFiniteError as err:
        kept = (
            f"the last good checkpoint is {run.checkpoint_path}"
            if run.checkpoint_path.exists()
            else "no checkpoint was written yet"
        )
        raise NonFiniteError(f"{err}; stopped, {kept} (try a lower optim.lr or optim.max_grad_norm)") from None
    run.step += progress.steps - steps_before
    return progress


def _finish_epoch(run: Run, epoch: int, progress: EpochProgress, writer: Any) -> None:
    """Validate, record the epoch (history, TensorBoard, log) and write the checkpoint."""
    fault_point("eval", epoch + 1)
    eval_start = time.perf_counter()
    valid_ppl = perplexity(*evaluate(run.model, run.valid_data, run.cfg.data.bptt))  # every rank: the same number
    train_nll, train_tokens = run.group.sum([progress.nll, progress.tokens])
    train_ppl = perplexity(train_nll, int(train_tokens)) if train_tokens else math.nan
    if not (math.isfinite(valid_ppl) and (math.isfinite(train_ppl) or not train_tokens)):
        kept = (
            f"the last good checkpoint is {run.checkpoint_path}"
            if run.checkpoint_path.exists()
            else "no checkpoint was written yet"
        )
        raise NonFiniteError(
            f"non-finite perplexity at epoch {epoch + 1} (train {train_ppl:g}, valid {valid_ppl:g}: the loss overflowed); "
            f"stopped, {kept} "
            f"(try a lower optim.lr or optim.max_grad_norm)"
        )
    run.best_valid = min(run.best_valid, valid_ppl)
    record = {
        "epoch": epoch + 1,
        "lr": learning_rate(epoch, run.cfg.optim),
        "train_ppl": train_ppl,
        "valid_ppl": valid_ppl,
        "words_per_s": train_tokens / progress.seconds,
        "seconds": progress.seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        "steps": progress.steps,
        "windows": len(run.windows),  # of the epoch: a whole epoch trained every one (metrics.json's completed)
        "skipped_steps": progress.skipped,
        "grad_norm": progress.grad_norm,
    }
    run.history.append(record)
    for key in ("train_ppl", "valid_ppl", "lr", "grad_norm", "words_per_s"):
        writer.add_scalar(f"epoch/{key}", record[key], epoch + 1)
    writer.flush()
    log.info(
        "epoch %2d  lr %.4g  train ppl %8.2f  valid ppl %8.2f  %6.0f words/s  %5.0fs",
        epoch + 1,
        record["lr"],
        record["train_ppl"],
        valid_ppl,
        record["words_per_s"],
        progress.seconds,
    )
    run.epochs_done = epoch + 1
    run.save()
