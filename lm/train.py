"""Training: ``python -m lm.train experiment=zaremba_small`` (any key overridable).

The loop is the paper's: cross-entropy summed over the BPTT window and
averaged over the batch (so lr 1 and clip 5 mean what they meant there),
global grad-norm clipping, plain SGD, an lr that is a pure function of the
epoch, and a hidden state carried (detached) across windows and reset at each
epoch and evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lm.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write_json,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lm.cli import run_hydra
from lm.config import ConfigError, OptimConfig, TrainConfig, validate, validate_saved
from lm.data import DataError, batchify, bptt_windows
from lm.distributed import Group, init_group
from lm.faults import NonFiniteError, StopRequest, TrainingInterrupted, fault_point
from lm.evaluate import PROTOCOL_DESCRIPTIONS, evaluate, evaluate_all, perplexity
from lm.model import LSTMLanguageModel, State, count_parameters, detach_state
from lm.runtime import git_commit, load_data, select_device

log = logging.getLogger("lm.train")

METRICS_NAME = "metrics.json"


# ---------------------------------------------------------------- pure pieces


def learning_rate(epoch: int, optim: OptimConfig) -> float:
    """The lr of 0-based ``epoch``.

    tf  (TF tutorial): lr * decay ** max(epoch + 1 - decay_start_epoch, 0),
        i.e. ``decay_start_epoch`` epochs at the full lr, as the paper states.
    lua (authors' code): decays one epoch later.
    """
    shift = 1 if optim.decay_convention == "tf" else 0
    return optim.lr * optim.lr_decay ** max(epoch + shift - optim.decay_start_epoch, 0)


# ---------------------------------------------------------------- one epoch


@dataclass
class EpochProgress:
    """Where an epoch stands; saved in a checkpoint when training stops mid-epoch."""

    window: int = 0  # index of the next window to train on
    nll: float = 0.0  # summed training NLL so far (nats)
    tokens: int = 0
    steps: int = 0
    skipped: int = 0  # non-finite steps skipped (trainer.nonfinite=skip)
    norm_sum: float = 0.0
    seconds: float = 0.0
    state: State | None = None  # hidden state carried into the next window

    @property
    def grad_norm(self) -> float:
        return self.norm_sum / max(self.steps - self.skipped, 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochProgress":
        return cls(**d)


def train_epoch(
    model: LSTMLanguageModel,
    windows: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    progress: EpochProgress | None = None,
    *,
    max_steps: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    skip_nonfinite: bool = False,
    epoch: int = 1,
    step_offset: int = 0,
    bar: Any = None,
    on_log: Callable[[int, float, float], None] | None = None,
    log_every: int = 100,
    reduce_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None,
    weight_decay: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
) -> EpochProgress:
    """Train on ``windows`` from ``progress.window`` on; returns where it stopped.

    Stops at the end of the windows, after ``max_steps`` steps of this call, or
    at the first step boundary after ``should_stop()`` turns true. The host
    syncs only every ``log_every`` steps (and per step with ``skip_nonfinite``).
    ``reduce_gradients`` (data-parallel training) runs between backward and clipping.
    ``weight_decay`` shrinks every weight by that fraction after each step,
    independent of the lr (Gal & Ghahramani's Lua code; SGD's own option would scale it by lr).
    ``autocast_dtype`` (bf16) runs the forward under autocast; weights, loss and state stay fp32.
    """
    progress = progress or EpochProgress()
    model.train()
    device = next(model.parameters()).device
    params = list(model.parameters())
    batch_size = windows[0][0].size(0)
    state = progress.state if progress.state is not None else model.init_state(batch_size)
    nll = torch.tensor(progress.nll, dtype=torch.float64, device=device)
    norm_sum = torch.tensor(progress.norm_sum, dtype=torch.float64, device=device)
    first_bad = torch.tensor(-1, device=device)  # global step of the first non-finite step, or -1
    steps_here = 0
    start = time.perf_counter()

    def check_finite() -> None:
        bad = int(first_bad)
        if bad >= 0:
            raise NonFiniteError(f"non-finite loss or gradient norm at epoch {epoch}, step {bad}")

    index = progress.window
    while index < len(windows):
        if should_stop() or (max_steps is not None and steps_here >= max_steps):
            break
        x, y = windows[index]
        index += 1
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        state = detach_state(state)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, state = model(x, state)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
        (loss_sum / batch_size).backward()  # summed over time, averaged over the batch
        if reduce_gradients is not None:
            reduce_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        step = step_offset + steps_here + 1
        if skip_nonfinite and not bool(finite):
            optimizer.zero_grad(set_to_none=True)
            progress.skipped += 1
            progress.steps += 1
            steps_here += 1
            continue
        optimizer.step()
        if weight_decay:
            with torch.no_grad():
                for p in params:
                    p.mul_(1.0 - weight_decay)
        optimizer.zero_grad(set_to_none=True)
        first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
        nll += loss_sum.detach().double()
        norm_sum += grad_norm.detach().double()
        progress.tokens += y.numel()
        progress.steps += 1
        steps_here += 1
        fault_point("step", step)
        if bar is not None:
            bar.update(y.numel())
        if steps_here % log_every == 0:
            check_finite()
            if on_log is not None:
                on_log(step, float(nll) / max(progress.tokens, 1), float(grad_norm))
    check_finite()
    progress.window = index
    progress.nll, progress.norm_sum = float(nll), float(norm_sum)
    progress.seconds += time.perf_counter() - start
    progress.state = detach_state(state)
    return progress


# ---------------------------------------------------------------- the run


class _NullWriter:
    """Stands in for TensorBoard's writer on ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _global_progress(progress: EpochProgress, group: Group) -> EpochProgress:
    """A mid-epoch position with every rank's streams (for the checkpoint); collective."""
    nll, tokens = group.sum([progress.nll, progress.tokens])
    state = [(group.gather_rows(h, 1), group.gather_rows(c, 1)) for h, c in progress.state] if progress.state else None
    return dataclasses.replace(progress, nll=nll, tokens=int(tokens), state=state)


def _local_progress(progress: EpochProgress, group: Group, batch_size: int, device: torch.device) -> EpochProgress:
    """This rank's share of a saved mid-epoch position (any number of ranks can resume it)."""
    rows = group.rows(batch_size)
    state = [(h[:, rows].to(device), c[:, rows].to(device)) for h, c in progress.state] if progress.state else None
    if not group.is_main:  # the sums are carried by rank 0 only, so that reducing them again is right
        return dataclasses.replace(progress, nll=0.0, tokens=0, state=state)
    return dataclasses.replace(progress, state=state)


def _check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, vocab_size: int) -> None:
    saved = validate_saved(ckpt["config"])
    for key in ("hidden_size", "num_layers"):
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if a != b:
            raise CheckpointError(f"checkpoint is from another model (model.{key} {a}, this run {b}): resume with the same model config")
    saved_vocab = ckpt["model"]["embedding.weight"].shape[0]
    if saved_vocab != vocab_size:
        raise CheckpointError(f"checkpoint has a vocabulary of {saved_vocab} words, this corpus {vocab_size}: resume on the same corpus")
    for key in ("tie_weights", "dropout_variant"):
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if a != b:
            raise CheckpointError(f"checkpoint is from another model (model.{key} {a}, this run {b}): resume with the same model config")
    if (saved.model.weight_drop > 0) != (cfg.model.weight_drop > 0):
        raise CheckpointError("checkpoint is from another model (weight dropping on in one, off in the other): resume with the same model.weight_drop")


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    if resume is None or resume == "":
        return None
    if resume == "auto":
        path = out_dir / CHECKPOINT_NAME
        return path if path.exists() else None
    return Path(resume)


def train(cfg: TrainConfig, out_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and write ``metrics.json`` into ``out_dir``; returns the metrics.

    Raises ``TrainingInterrupted`` after checkpointing when a stop signal arrives,
    and ``NonFiniteError`` (keeping the last good checkpoint) on a NaN/inf step.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    wall_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    for stale in out_dir.glob(CHECKPOINT_NAME + ".*.tmp"):  # left by a crash mid-write; never loaded
        stale.unlink()
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = select_device(cfg.trainer.device)
    autocast_dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else None
    if autocast_dtype is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.precision=bf16: this GPU has no bf16 support; use trainer.precision=fp32")
    group = init_group(device.type == "cuda")
    if group.active:
        if cfg.data.batch_size % group.world_size:
            raise ConfigError(f"data.batch_size {cfg.data.batch_size} must be divisible by the {group.world_size} processes")
        if device.type == "cuda":
            device = torch.device("cuda", group.local_rank)
        if not group.is_main:
            log.setLevel(logging.WARNING)
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    corpus = load_data(cfg.data)
    train_data = batchify(corpus.train, cfg.data.batch_size)
    valid_data = batchify(corpus.valid, cfg.data.batch_size)
    batchify(corpus.test, 1)  # fail early if the test split cannot be evaluated
    if cfg.data.bptt >= train_data.size(1):
        raise DataError(
            f"data.bptt {cfg.data.bptt} is not shorter than each of the {cfg.data.batch_size} training streams "
            f"({train_data.size(1)} tokens): lower data.bptt or data.batch_size"
        )
    # this rank's streams, on the device once (a per-step copy from pageable memory would sync the host on GPU)
    windows = bptt_windows(train_data[group.rows(cfg.data.batch_size)].to(device), cfg.data.bptt)

    torch.manual_seed(cfg.trainer.seed)
    model = LSTMLanguageModel.from_config(cfg.model, len(corpus.vocab)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, foreach=True)
    history: list[dict[str, Any]] = []
    start_epoch = global_step = 0
    best_valid = math.inf
    partial: EpochProgress | None = None
    wall_before, sessions = 0.0, 1  # wall time and processes of this run before this one (resumes)

    resume_path = resolve_resume(cfg.trainer.resume, out_dir)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        _check_resumable(ckpt, cfg, len(corpus.vocab))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        history, start_epoch, global_step = ckpt["history"], ckpt["epoch"], ckpt["step"]
        best_valid = ckpt["best_valid_ppl"]
        if ckpt.get("partial_epoch"):
            partial = _local_progress(EpochProgress.from_dict(ckpt["partial_epoch"]), group, cfg.data.batch_size, device)
        # checkpoints from before this was recorded: the time their epochs and evaluations took
        wall_before = ckpt.get("wall_seconds", sum(e["seconds"] + e.get("eval_seconds", 0.0) for e in history)
                               + (partial.seconds if partial else 0.0))
        sessions = ckpt.get("sessions", 1) + 1
        where = f"epoch {start_epoch + 1}, window {partial.window}" if partial else f"the end of epoch {start_epoch}"
        log.info("resumed from %s at %s (step %d)", resume_path, where, global_step)

    def save(epoch_done: int, partial_epoch: EpochProgress | None) -> None:
        partial_epoch = _global_progress(partial_epoch, group) if partial_epoch else None  # collective
        if not group.is_main:
            return
        save_checkpoint(checkpoint_path, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "config": config_dict,
            "vocab": corpus.vocab.itos,
            "epoch": epoch_done,
            "step": global_step,
            "history": history,
            "best_valid_ppl": best_valid,
            "partial_epoch": partial_epoch.to_dict() if partial_epoch else None,
            "wall_seconds": wall_before + time.perf_counter() - wall_start,
            "sessions": sessions,
        }, before_commit=lambda: fault_point("checkpoint", epoch_done))

    log.info(
        "%s: %s parameters, %d train windows of %dx%d per epoch, device %s, %d threads, %s",
        cfg.name, f"{count_parameters(model):,}", len(windows), cfg.data.batch_size, cfg.data.bptt, device, torch.get_num_threads(),
        cfg.trainer.precision,
    )
    writer = SummaryWriter(log_dir=str(out_dir / "tb")) if group.is_main else _NullWriter()
    max_steps = cfg.trainer.max_steps

    def on_log(step: int, mean_nll: float, grad_norm: float) -> None:
        writer.add_scalar("train/step_ppl", math.exp(min(mean_nll, 50.0)), step)
        writer.add_scalar("train/grad_norm", grad_norm, step)

    try:
        with StopRequest() as stop:
            for epoch in range(start_epoch, cfg.trainer.epochs):
                if max_steps is not None and global_step >= max_steps:
                    break
                lr = learning_rate(epoch, cfg.optim)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                progress, partial = partial or EpochProgress(), None
                remaining = None if max_steps is None else max_steps - global_step
                todo = len(windows) - progress.window
                total = min(todo, remaining or todo) * cfg.data.batch_size * cfg.data.bptt
                steps_before = progress.steps
                try:
                    with tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}", unit="w", unit_scale=True,
                              disable=not (cfg.trainer.progress and group.is_main), leave=False, dynamic_ncols=True) as bar:
                        progress = train_epoch(
                            model, windows, optimizer, cfg.optim.max_grad_norm, progress,
                            max_steps=remaining, should_stop=lambda: group.any(bool(stop)), skip_nonfinite=cfg.trainer.nonfinite == "skip",
                            epoch=epoch + 1, step_offset=global_step, bar=bar, on_log=on_log, log_every=cfg.trainer.log_every,
                            reduce_gradients=group.average_gradients if group.active else None,
                            weight_decay=cfg.optim.weight_decay, autocast_dtype=autocast_dtype,
                        )
                except NonFiniteError as err:
                    kept = f"the last good checkpoint is {checkpoint_path}" if checkpoint_path.exists() else "no checkpoint was written yet"
                    raise NonFiniteError(f"{err}; stopped, {kept} (try a lower optim.lr or optim.max_grad_norm)") from None
                global_step += progress.steps - steps_before
                stopped = group.any(bool(stop))
                if progress.window < len(windows) and stopped:
                    save(epoch, progress)
                    stop.forward()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, (
                        f"stopped by {stop.name or 'another rank'} in epoch {epoch + 1} at step {global_step}; checkpoint {checkpoint_path}. "
                        f"Resume with the same command plus trainer.resume=auto"))
                fault_point("eval", epoch + 1)
                eval_start = time.perf_counter()
                valid_ppl = perplexity(*evaluate(model, valid_data, cfg.data.bptt))  # every rank: the same number
                best_valid = min(best_valid, valid_ppl)
                train_nll, train_tokens = group.sum([progress.nll, progress.tokens])
                record = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_ppl": perplexity(train_nll, int(train_tokens)),
                    "valid_ppl": valid_ppl,
                    "words_per_s": train_tokens / progress.seconds,
                    "seconds": progress.seconds,
                    "eval_seconds": time.perf_counter() - eval_start,
                    "steps": progress.steps,
                    "skipped_steps": progress.skipped,
                    "grad_norm": progress.grad_norm,
                }
                history.append(record)
                for key in ("train_ppl", "valid_ppl", "lr", "grad_norm", "words_per_s"):
                    writer.add_scalar(f"epoch/{key}", record[key], epoch + 1)
                writer.flush()
                log.info(
                    "epoch %2d  lr %.4g  train ppl %8.2f  valid ppl %8.2f  %6.0f words/s  %5.0fs",
                    epoch + 1, lr, record["train_ppl"], valid_ppl, record["words_per_s"], progress.seconds,
                )
                save(epoch + 1, None)
                if stopped and epoch + 1 < cfg.trainer.epochs:
                    stop.forward()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, (
                        f"stopped by {stop.name or 'another rank'} after epoch {epoch + 1}; checkpoint {checkpoint_path}. "
                        f"Resume with the same command plus trainer.resume=auto"))
    finally:
        writer.close()
        if sys.exc_info()[0] is not None:
            group.close()

    log.info("final evaluation (valid and test, both protocols)")
    results = evaluate_all(model, corpus, cfg.data.batch_size, cfg.data.bptt, cfg.trainer.eval_window)
    group.close()
    metrics = {
        "name": cfg.name,
        "valid_ppl": results["valid"]["batched"]["ppl"],
        "test_ppl": results["test"]["stream"]["ppl"],
        "valid_protocol": "batched",
        "test_protocol": "stream",
        "protocols": PROTOCOL_DESCRIPTIONS,
        "eval": {s: {p: r["ppl"] for p, r in by_p.items()} for s, by_p in results.items()},
        "test_predictions": results["test"]["stream"]["tokens"],
        "best_valid_ppl": best_valid,
        "epochs": history,
        "steps": global_step,
        "completed": len(history) == cfg.trainer.epochs and history[-1]["steps"] == len(windows) if history else False,
        "skipped_steps": sum(e.get("skipped_steps", 0) for e in history),
        "train_seconds": sum(e["seconds"] for e in history),
        "wall_seconds": wall_before + time.perf_counter() - wall_start,  # summed over resumes
        "sessions": sessions,
        "parameters": count_parameters(model),
        "seed": cfg.trainer.seed,
        "config": config_dict,
        "overrides": list(overrides or []),
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "processes": group.world_size,
        "platform": platform.platform(),
    }
    if group.is_main:
        atomic_write_json(out_dir / METRICS_NAME, metrics)
    log.info("valid ppl %.2f (batched)  test ppl %.2f (paper protocol)  -> %s", metrics["valid_ppl"], metrics["test_ppl"], out_dir / METRICS_NAME)
    return metrics


# ---------------------------------------------------------------- entry point


def check_writable(folder: Path, key: str) -> None:
    """Refuse an output folder that cannot be created or written, before anything runs."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not writable"
        raise ConfigError(f"{key}: cannot write {folder} ({existing} {problem}): choose another folder")


def preflight(cfg: DictConfig) -> None:
    """Checks that must pass before anything is written: config values, an existing finished run."""
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    c = validate(job_cfg)
    run_dir = Path(cfg.hydra.run.dir)
    check_writable(run_dir, "hydra.run.dir")
    if (run_dir / METRICS_NAME).exists() and c.trainer.resume is None and not c.trainer.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a finished run: pass trainer.resume=auto to continue it, trainer.overwrite=true to replace it, "
            f"or hydra.run.dir=... for a new folder"
        )


def _train_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    train(validate(cfg), hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))


def _hydra_entry() -> None:
    run_hydra(_train_job, "train", preflight=preflight)


if __name__ == "__main__":
    _hydra_entry()
