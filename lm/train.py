"""Training: ``python -m lm.train experiment=zaremba_small`` (any key overridable).

A run around the paper's step (``lm.step``: cross-entropy summed over the BPTT window
and averaged over the batch, so lr 1 and clip 5 mean what they meant there; global
grad-norm clipping; plain SGD; an lr that is a pure function of the epoch): it claims
its folder, continues from a checkpoint when asked, trains epoch by epoch with the
hidden state reset at each epoch and evaluation, checkpoints atomically after each
epoch and on a stop signal, and ends with the final evaluation and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lm.checkpoint import (
    CHECKPOINT_NAME,
    RESUME_REQUIRED,
    CheckpointError,
    RunFolderError,
    RunFolderLock,
    atomic_write_json,
    load_checkpoint,
    rng_digest,
    rng_state,
    save_checkpoint,
    set_rng_state,
    vocab_digest,
)
from lm.cli import check_output_folder, run_hydra
from lm.config import (
    ConfigError, DataConfig, TrainConfig, TrainerConfig, check_group_choices, ignored_overrides, resume_values,
    validate, validate_saved,
)
from lm.data import Corpus, DataError, batchify, bptt_windows
from lm.distributed import Group, init_group, launch_rank
from lm.faults import NonFiniteError, StopRequest, TrainingInterrupted, fault_point
from lm.evaluate import PROTOCOL_DESCRIPTIONS, evaluate, evaluate_all, perplexity
from lm.kernels import cpu_info
from lm.loss import WindowLoss
from lm.model import LSTMLanguageModel, count_parameters
from lm.runtime import check_vocab, fp32_products, load_data, precision_record, provenance, select_device
from lm.step import EpochLoop, EpochProgress, StepRecipe, learning_rate, train_epoch

log = logging.getLogger("lm.train")

METRICS_NAME = "metrics.json"
# What a run writes into its folder: removed first by trainer.overwrite=true (tb/ is a folder).
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, "eval.json")
# Steps between the checks for a stop signal under torchrun: each is an all-reduce with a host
# sync, so a signal takes effect within this many steps (a single process checks every step).
STOP_CHECK_EVERY = 20


# ---------------------------------------------------------------- the state of a run


@dataclass
class Run:
    """One training run: what ``prepare_run`` sets up, and what a checkpoint saves of it."""

    cfg: TrainConfig
    out_dir: Path
    overrides: list[str]
    started: float  # perf_counter when this process began the run
    device: torch.device
    group: Group
    corpus: Corpus
    windows: list[tuple[torch.Tensor, torch.Tensor]]  # this rank's training windows, on the device
    valid_data: torch.Tensor
    model: LSTMLanguageModel
    optimizer: torch.optim.Optimizer
    recipe: StepRecipe
    config_dict: dict[str, Any]  # the resolved config, as checkpoints and metrics.json store it
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    epochs_done: int = 0
    step: int = 0  # optimizer steps so far, over all epochs and processes
    best_valid: float = math.inf
    partial: EpochProgress | None = None  # a resumed mid-epoch position, taken up by the next epoch
    wall_before: float = 0.0  # wall time of this run's earlier processes (resumes)
    sessions: int = 1  # processes this run has taken, this one included
    changes: list[dict[str, Any]] = field(default_factory=list)  # keys changed on resume (trainer.allow_changes)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def wall_seconds(self) -> float:
        """Wall time of the run, summed over its processes."""
        return self.wall_before + time.perf_counter() - self.started

    def max_steps_reached(self) -> bool:
        return self.cfg.trainer.max_steps is not None and self.step >= self.cfg.trainer.max_steps

    def checkpoint_payload(self, partial: EpochProgress | None, rng: dict[str, Any]) -> dict[str, Any]:
        """Everything a resume needs; ``partial`` is a mid-epoch position with every rank's streams."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,  # every rank's generator state, checked to be one (``save``)
            "config": self.config_dict,
            "vocab": self.corpus.vocab.itos,
            "vocab_sha256": vocab_digest(self.corpus.vocab.itos),
            "changes": self.changes,
            "epoch": self.epochs_done,
            "step": self.step,
            "history": self.history,
            "best_valid_ppl": self.best_valid,
            "partial_epoch": partial.to_dict() if partial else None,
            "wall_seconds": self.wall_seconds(),
            "sessions": self.sessions,
        }

    def save(self, partial: EpochProgress | None = None) -> None:
        """Write the checkpoint (rank 0), atomically. Collective: every rank calls it (the ranks'
        generator states are checked to be one, and a mid-epoch ``partial`` gathers every rank's streams)."""
        partial = _global_progress(partial, self.group) if partial else None
        rng = rng_state(self.device)
        if not self.group.agree(rng_digest(rng)):  # one state saved for all: they must be one (lm.dropout.BatchShare)
            raise RuntimeError("the processes' random generators have drifted apart (a draw made by some ranks only): "
                               "their dropout masks are no longer one global draw; this is a bug, please report it")
        if self.group.is_main:
            save_checkpoint(self.checkpoint_path, self.checkpoint_payload(partial, rng),
                            before_commit=lambda: fault_point("checkpoint", self.epochs_done))

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Take up the state a checkpoint saved (the inverse of ``checkpoint_payload``)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], self.device)
        self.history, self.epochs_done, self.step = ckpt["history"], ckpt["epoch"], ckpt["step"]
        self.best_valid = ckpt["best_valid_ppl"]
        if ckpt.get("partial_epoch"):
            saved = EpochProgress.from_dict(ckpt["partial_epoch"])
            self.partial = _local_progress(saved, self.group, self.cfg.data.batch_size, self.device)
        # checkpoints from before this was recorded: the time their epochs and evaluations took
        self.wall_before = ckpt.get("wall_seconds", sum(e["seconds"] + e.get("eval_seconds", 0.0) for e in self.history)
                                    + (self.partial.seconds if self.partial else 0.0))
        self.sessions = ckpt.get("sessions", 1) + 1
        self.changes = list(ckpt.get("changes", []))


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


# ---------------------------------------------------------------- the run, step by step


def train(cfg: TrainConfig, out_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and write ``metrics.json`` into ``out_dir``; returns the metrics.

    The folder is locked for the whole run and claimed first (``claim_run_folder``: what it
    holds decides whether this run may start, continue or replace it). Raises
    ``TrainingInterrupted`` after checkpointing when a stop signal arrives, ``NonFiniteError``
    (keeping the last good checkpoint) on a NaN/inf step or perplexity, and ``RunFolderError``,
    ``CheckpointError`` or ``ConfigError`` when the folder or the checkpoint cannot be used.
    """
    out_dir = Path(out_dir)
    lock = RunFolderLock(out_dir) if launch_rank() == 0 else contextlib.nullcontext()  # one lock per run, not per rank
    with lock, StopRequest() as stop, fp32_products(cfg.trainer.tf32):  # the folder and signals are this run's until it ends
        resume_from = claim_run_folder(out_dir, cfg.trainer)
        run = prepare_run(cfg, out_dir, list(overrides or []))
        try:
            if resume_from is not None:
                resume(run, resume_from)
                finished = _already_finished(run)
                if finished is not None:
                    return finished
            train_epochs(run, stop)
            results = evaluate_final(run, stop)
        finally:
            run.group.close()
        return write_metrics(run, results)


def claim_run_folder(out_dir: Path, trainer: TrainerConfig) -> Path | None:
    """What this run may do with ``out_dir``, decided from what the folder holds, before any work;
    returns the checkpoint to resume from, if any. Also used by the preflight of a single run.

    - ``trainer.overwrite=true``: the run there (if any) is replaced (its files are removed when
      training starts); with ``trainer.resume`` it is a contradiction.
    - no ``trainer.resume``: the folder must hold no run (no checkpoint.pt, no metrics.json).
    - ``trainer.resume=auto``: continue the folder's checkpoint.pt; none there starts afresh,
      unless metrics.json is there (a finished run without its checkpoint cannot be continued).
    - ``trainer.resume=PATH``: the folder must hold no run, unless PATH is its own checkpoint.
    """
    checkpoint, metrics = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    holds = "a finished run" if metrics.exists() else "an unfinished run (checkpoint.pt, no metrics.json)" if checkpoint.exists() else None
    resume = trainer.resume or None
    if trainer.overwrite:
        if resume is not None:
            raise ConfigError(f"trainer.overwrite=true replaces the run in {out_dir}, trainer.resume={resume} continues one: give one of them")
        return None
    if resume is None:
        if holds:
            raise RunFolderError(
                f"{out_dir} already holds {holds}: pass trainer.resume=auto to continue it, trainer.overwrite=true to replace it, "
                f"or hydra.run.dir=... for a new folder"
            )
        return None
    if resume == "auto":
        if checkpoint.exists():
            return checkpoint
        if metrics.exists():
            raise RunFolderError(
                f"{out_dir} holds a finished run's metrics.json but no checkpoint.pt, so trainer.resume=auto cannot continue it: "
                f"trainer.overwrite=true replaces it, or choose another folder with hydra.run.dir=..."
            )
        return None  # nothing there yet: a fresh run (a rerun of a sweep or of make ablation)
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if holds and path.resolve() != checkpoint.resolve():
        raise RunFolderError(
            f"{out_dir} already holds {holds}, which trainer.resume={resume} would replace: resume into a new folder "
            f"(hydra.run.dir=...), or pass trainer.overwrite=true"
        )
    if not path.is_file():
        raise CheckpointError(f"trainer.resume: checkpoint {path} does not exist: give the path of a checkpoint.pt written by lm.train")
    return path


def _clear_run_folder(out_dir: Path) -> None:
    """trainer.overwrite=true: remove the files of the run being replaced (under the folder's lock)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "tb", ignore_errors=True)


def _already_finished(run: Run) -> dict[str, Any] | None:
    """A resumed run with every epoch trained and its metrics.json written: nothing to do (e.g. a
    rerun of ``make ablation``); returns those metrics, written again by no one."""
    path = run.out_dir / METRICS_NAME
    done = run.epochs_done >= run.cfg.trainer.epochs or run.max_steps_reached()
    if not done or run.partial is not None or not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("steps") != run.step or not isinstance(metrics.get("epochs"), list) or len(metrics["epochs"]) != run.epochs_done:
        return None
    log.info("%s already holds this run, finished (%d epochs, step %d): nothing to do", run.out_dir, run.epochs_done, run.step)
    return metrics


def prepare_run(cfg: TrainConfig, out_dir: Path, overrides: list[str]) -> Run:
    """The output folder, the device and processes, the data, a fresh model and optimizer."""
    started = time.perf_counter()
    for key in ignored_overrides(cfg, overrides):
        log.warning("%s has no effect with model.dropout_variant=%s: see configs/train.yaml", key, cfg.model.dropout_variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(CHECKPOINT_NAME + ".*.tmp"):  # left by a crash mid-write; never loaded
        stale.unlink()
    device, group = _set_up_processes(cfg)
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    corpus = load_data(cfg.data)
    windows, valid_data = _training_data(corpus, cfg.data, group, device)
    torch.manual_seed(cfg.trainer.seed)
    model = LSTMLanguageModel.from_config(cfg.model, len(corpus.vocab)).to(device)
    model.share_batch(group.share(cfg.data.batch_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, foreach=True)
    recipe = StepRecipe(
        max_grad_norm=cfg.optim.max_grad_norm, weight_decay=cfg.optim.weight_decay,
        autocast_dtype=torch.bfloat16 if cfg.trainer.precision == "bf16" else None,
        skip_nonfinite=cfg.trainer.nonfinite == "skip",
        objective=group.wrap(WindowLoss(model), device),
    )
    if cfg.trainer.overwrite and group.is_main:  # only now that the new run can start: a refused one keeps the old
        _clear_run_folder(out_dir)
    return Run(cfg, out_dir, overrides, started, device, group, corpus, windows, valid_data, model, optimizer, recipe, config_dict)


def _set_up_processes(cfg: TrainConfig) -> tuple[torch.device, Group]:
    """Threads, the device, and the process group when started by torchrun."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = select_device(cfg.trainer.device)
    if cfg.trainer.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError("trainer.precision=bf16: this GPU has no native bf16 (it would be emulated, slowly); use trainer.precision=fp32")
    if cfg.trainer.precision == "bf16" and device.type == "cpu" and cpu_info()["bf16"] == "none":
        # a warning, not a refusal: tiny runs (tests) and a resume begun on another CPU still work
        log.warning("trainer.precision=bf16: this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm BF16), so bf16 "
                    "products are emulated (the medium step measured 37x slower than fp32 on an AVX2-only EPYC): use trainer.precision=fp32")
    group = init_group(device.type == "cuda")
    if group.active:
        if cfg.data.batch_size % group.world_size:
            raise ConfigError(f"data.batch_size {cfg.data.batch_size} must be divisible by the {group.world_size} processes")
        if device.type == "cuda":
            device = torch.device("cuda", group.local_rank)
        if not group.is_main:
            log.setLevel(logging.WARNING)
    return device, group


def _training_data(corpus: Corpus, data: DataConfig, group: Group, device: torch.device) -> tuple[list, torch.Tensor]:
    """This rank's training windows on the device, and the batched validation split."""
    train_data = batchify(corpus.train, data.batch_size)
    valid_data = batchify(corpus.valid, data.batch_size)
    batchify(corpus.test, data.batch_size)  # fail now, not after training, if the final evaluation cannot batch it
    if data.bptt >= train_data.size(1):
        raise DataError(
            f"data.bptt {data.bptt} is not shorter than each of the {data.batch_size} training streams "
            f"({train_data.size(1)} tokens): lower data.bptt or data.batch_size"
        )
    # this rank's streams, on the device once (a per-step copy from pageable memory would sync the host on GPU)
    return bptt_windows(train_data[group.rows(data.batch_size)].to(device), data.bptt), valid_data


def resume(run: Run, path: Path) -> None:
    """Continue from the checkpoint at ``path`` (checked: same model, same vocabulary word for
    word, same recipe unless ``trainer.allow_changes`` names a key)."""
    ckpt = load_checkpoint(path, required=RESUME_REQUIRED)
    changed = check_resumable(ckpt, run.cfg, path)
    check_vocab(ckpt, run.corpus.vocab, "this run's corpus")
    try:
        run.restore(ckpt)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be resumed ({str(err).splitlines()[0][:160]}): it is damaged, use another one") from None
    run.changes += [{"key": k, "from": a, "to": b, "step": run.step} for k, a, b in changed]
    where = f"epoch {run.epochs_done + 1}, window {run.partial.window}" if run.partial else f"the end of epoch {run.epochs_done}"
    log.info("resumed from %s at %s (step %d)", path, where, run.step)


def _changed_keys(saved: TrainConfig, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, this run's value) of every key a resume must keep that differs."""
    before, after = resume_values(saved), resume_values(cfg)
    return [(key, before[key], after[key]) for key in before if before[key] != after[key]]


def check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, path: Path) -> list[tuple[str, Any, Any]]:
    """Refuse a checkpoint of another model, or one whose recipe this run changes (a key of
    ``RESUME_KEYS`` not in ``trainer.allow_changes``); returns the allowed changes. The vocabulary
    is compared when the corpus is loaded (``check_vocab``)."""
    _check_same_model(ckpt, cfg)
    changed = _changed_keys(validate_saved(ckpt["config"]), cfg)
    refused = [c for c in changed if c[0] not in cfg.trainer.allow_changes]
    if refused:
        key, before, after = refused[0]
        raise CheckpointError(
            f"{key} is {after!r} here but {before!r} in the checkpoint being resumed ({path}): resume with {key}={before}, "
            f"or pass trainer.allow_changes=[{key}] to change it from step {ckpt['step']} on"
            + (f" ({len(refused) - 1} more changed)" if len(refused) > 1 else "")
        )
    return changed


def _check_same_model(ckpt: dict[str, Any], cfg: TrainConfig) -> None:
    saved = validate_saved(ckpt["config"])
    for key in ("hidden_size", "num_layers"):
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if a != b:
            raise CheckpointError(f"checkpoint is from another model (model.{key} {a}, this run {b}): resume with the same model config")
    for key in ("tie_weights", "dropout_variant"):
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if a != b:
            raise CheckpointError(f"checkpoint is from another model (model.{key} {a}, this run {b}): resume with the same model config")
    if (saved.model.weight_drop > 0) != (cfg.model.weight_drop > 0):
        raise CheckpointError("checkpoint is from another model (weight dropping on in one, off in the other): resume with the same model.weight_drop")


def train_epochs(run: Run, stop: StopRequest | None = None) -> None:
    """The epochs left to train, each ending with validation and a checkpoint; a stop signal
    ends the loop after a checkpoint (mid-epoch or at the epoch's end) with ``TrainingInterrupted``,
    also one that came during the last epoch's validation."""
    if stop is None:
        with StopRequest() as own:
            return train_epochs(run, own)
    cfg = run.cfg
    log.info(
        "%s: %s parameters, %d train windows of %dx%d per epoch, device %s, %d threads, %s",
        cfg.name, f"{count_parameters(run.model):,}", len(run.windows), cfg.data.batch_size, cfg.data.bptt, run.device,
        torch.get_num_threads(), cfg.trainer.precision,
    )
    writer = _open_writer(run)
    try:
        for epoch in range(run.epochs_done, cfg.trainer.epochs):
            if run.max_steps_reached():
                break
            progress = _train_one_epoch(run, epoch, lambda: run.group.any(bool(stop)), writer)
            stopped = run.group.any(bool(stop))
            mid_epoch = progress.window < len(run.windows)
            if stopped and mid_epoch and run.step == 0:  # stopped while setting up: nothing to keep
                stop.forward()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, f"stopped by {stop.name or 'another rank'} before the "
                                          f"first step; no checkpoint written, the same command starts the run again")
            if stopped and mid_epoch:
                run.save(progress)
                _interrupt(stop, f"in epoch {epoch + 1} at step {run.step}", run.checkpoint_path)
            _finish_epoch(run, epoch, progress, writer)
            if run.group.any(bool(stop)):  # before or during this epoch's validation, the last one's too
                _interrupt(stop, f"after epoch {epoch + 1}", run.checkpoint_path)
    finally:
        writer.close()


def _open_writer(run: Run) -> Any:
    """TensorBoard's writer into ``<run>/tb`` on rank 0; a stand-in that drops everything elsewhere."""
    from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard, protobuf): only a training run needs it

    return SummaryWriter(log_dir=str(run.out_dir / "tb")) if run.group.is_main else _NullWriter()


class _NullWriter:
    """Stands in for TensorBoard's writer on ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _train_one_epoch(run: Run, epoch: int, should_stop: Callable[[], bool], writer: Any) -> EpochProgress:
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
        with tqdm(total=min(todo, remaining or todo) * cfg.data.batch_size * cfg.data.bptt, unit="w", unit_scale=True,
                  desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}", disable=not (cfg.trainer.progress and run.group.is_main),
                  leave=False, dynamic_ncols=True) as bar:
            loop = EpochLoop(max_steps=remaining, should_stop=should_stop, stop_every=STOP_CHECK_EVERY if run.group.active else 1,
                             epoch=epoch + 1, step_offset=run.step, log_every=cfg.trainer.log_every, on_log=on_log, bar=bar)
            progress = train_epoch(run.model, run.windows, run.optimizer, run.recipe, progress, loop)
    except NonFiniteError as err:
        kept = f"the last good checkpoint is {run.checkpoint_path}" if run.checkpoint_path.exists() else "no checkpoint was written yet"
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
        kept = f"the last good checkpoint is {run.checkpoint_path}" if run.checkpoint_path.exists() else "no checkpoint was written yet"
        raise NonFiniteError(
            f"non-finite perplexity at epoch {epoch + 1} (train {train_ppl:g}, valid {valid_ppl:g}: the loss overflowed); stopped, {kept} "
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
        "skipped_steps": progress.skipped,
        "grad_norm": progress.grad_norm,
    }
    run.history.append(record)
    for key in ("train_ppl", "valid_ppl", "lr", "grad_norm", "words_per_s"):
        writer.add_scalar(f"epoch/{key}", record[key], epoch + 1)
    writer.flush()
    log.info(
        "epoch %2d  lr %.4g  train ppl %8.2f  valid ppl %8.2f  %6.0f words/s  %5.0fs",
        epoch + 1, record["lr"], record["train_ppl"], valid_ppl, record["words_per_s"], progress.seconds,
    )
    run.epochs_done = epoch + 1
    run.save()


def _interrupt(stop: StopRequest, where: str, checkpoint: Path) -> NoReturn:
    """The one way a stop signal ends training: after the checkpoint, pass the signal on and raise."""
    stop.forward()
    raise TrainingInterrupted(stop.signum or signal.SIGTERM, (
        f"stopped by {stop.name or 'another rank'} {where}; checkpoint {checkpoint}. "
        f"Resume with the same command plus trainer.resume=auto"))


def evaluate_final(run: Run, stop: StopRequest | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Valid and test perplexity under both protocols (``lm.evaluate``). Every epoch is in the
    checkpoint by now, so a stop signal here ends the run at once (``TrainingInterrupted``);
    a non-finite perplexity is a ``NonFiniteError`` (no metrics.json is written)."""
    log.info("final evaluation (valid and test, both protocols)")
    where = "during the final evaluation (every trained step is in the checkpoint)"
    if stop is not None:
        stop.on_signal = lambda: _interrupt(stop, where, run.checkpoint_path)
        if stop:
            _interrupt(stop, where, run.checkpoint_path)
    try:
        fault_point("final", 1)
        results = evaluate_all(run.model, run.corpus, run.cfg.data.batch_size, run.cfg.data.bptt, run.cfg.trainer.eval_window)
    finally:
        if stop is not None:
            stop.on_signal = None
    bad = [f"{s} {p} {r['ppl']:g}" for s, by_p in results.items() for p, r in by_p.items() if not math.isfinite(r["ppl"])]
    if bad:
        raise NonFiniteError(f"final evaluation: non-finite perplexity ({', '.join(bad)}); metrics.json not written (try a lower optim.lr)")
    return results


def metrics_record(run: Run, results: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """What ``metrics.json`` holds: the numbers, the history and how they were made."""
    history = run.history
    return {
        "name": run.cfg.name,
        "valid_ppl": results["valid"]["batched"]["ppl"],
        "test_ppl": results["test"]["stream"]["ppl"],
        "valid_protocol": "batched",
        "test_protocol": "stream",
        "protocols": PROTOCOL_DESCRIPTIONS,
        "eval": {s: {p: r["ppl"] for p, r in by_p.items()} for s, by_p in results.items()},
        "test_predictions": results["test"]["stream"]["tokens"],
        "best_valid_ppl": run.best_valid,
        "epochs": history,
        "steps": run.step,
        # every step of every epoch trained (a trainer.max_steps run continued later is not)
        "completed": len(history) == run.cfg.trainer.epochs and all(e["steps"] == len(run.windows) for e in history),
        "skipped_steps": sum(e.get("skipped_steps", 0) for e in history),
        "train_seconds": sum(e["seconds"] for e in history),
        "wall_seconds": run.wall_seconds(),  # summed over resumes
        "sessions": run.sessions,
        "resume_changes": run.changes,  # keys changed on resume (trainer.allow_changes), with the step from which
        "parameters": count_parameters(run.model),
        "seed": run.cfg.trainer.seed,
        "config": run.config_dict,
        "overrides": run.overrides,
        **provenance(run.device),
        "precision": precision_record(run.device, run.cfg.trainer.precision, run.cfg.trainer.tf32),
        "processes": run.group.world_size,
        "platform": platform.platform(),
    }


def write_metrics(run: Run, results: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """``metrics.json`` (rank 0, atomically); returns its content."""
    metrics = metrics_record(run, results)
    path = run.out_dir / METRICS_NAME
    if run.group.is_main:
        atomic_write_json(path, metrics)
    log.info("valid ppl %.2f (batched)  test ppl %.2f (paper protocol)  -> %s", metrics["valid_ppl"], metrics["test_ppl"], path)
    return metrics


# ---------------------------------------------------------------- entry point


def preflight(cfg: DictConfig) -> None:
    """Checks that must pass before anything is written: config values, an existing finished run."""
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    c = validate(job_cfg)
    check_group_choices(list(cfg.hydra.overrides.task), cfg.hydra.runtime.choices)
    select_device(c.trainer.device)  # cuda without a GPU
    run_dir = Path(cfg.hydra.run.dir)
    check_output_folder(run_dir, "hydra.run.dir", ConfigError)
    if launch_rank() == 0:  # a run in progress there: say so (the other ranks of a torchrun job find rank 0's own lock)
        RunFolderLock.check_free(run_dir)
    resume_from = claim_run_folder(run_dir, c.trainer)
    if resume_from is not None:  # what can be checked without the corpus, before Hydra writes its log there
        check_resumable(load_checkpoint(resume_from, required=RESUME_REQUIRED), c, resume_from)


def _train_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    check_group_choices(list(hydra_cfg.overrides.task), hydra_cfg.runtime.choices)  # also each job of a sweep
    train(validate(cfg), hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))


def _hydra_entry() -> None:
    run_hydra(_train_job, "train", preflight=preflight)


if __name__ == "__main__":
    _hydra_entry()
