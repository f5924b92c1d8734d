"""The state of one training run (``Run``), what a checkpoint saves of it, and its set-up: the
device and processes, the data, a fresh model, optimizer and step options."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lm import kernels
from lm.config import ConfigError, DataConfig, TrainConfig, ignored_overrides
from lm.data.batching import batchify, bptt_windows
from lm.data.corpus import Corpus
from lm.engine.distributed import Group, init_group
from lm.engine.run_folder import clear_run_folder
from lm.engine.runtime import load_data, select_device
from lm.engine.step import EpochProgress, StepOptions
from lm.infra.checkpoint import CHECKPOINT_NAME, rng_digest, rng_state, save_checkpoint, set_rng_state, vocab_digest
from lm.infra.errors import DataError
from lm.infra.faults import fault_point
from lm.kernels import cpu_info
from lm.model.cells.state import gather_state, state_rows
from lm.model.language_model import LanguageModel
from lm.model.loss import WindowLoss

log = logging.getLogger("lm.train")  # one logger for the whole training run (its train.log)


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
    model: LanguageModel
    optimizer: torch.optim.Optimizer
    step_options: StepOptions  # how each step is computed (precision, clipping, weight decay, the loss)
    config_dict: dict[str, Any]  # the resolved config, as checkpoints and metrics.json store it
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    epochs_done: int = 0
    step: int = 0  # optimizer steps so far, over all epochs and processes
    best_valid: float = math.inf
    partial: EpochProgress | None = None  # a resumed mid-epoch position, taken up by the next epoch
    wall_before: float = 0.0  # wall time of this run's earlier processes (resumes)
    sessions: int = 1  # processes this run has taken, this one included
    changes: list[dict[str, Any]] = field(default_factory=list)  # keys changed on resume (trainer.allow_changes)
    kernels: str = kernels.FUSED  # which kernels train it (lm.kernels.path): their dropout masks differ
    resumed_here: bool = False  # continued from this folder's own checkpoint (its earlier files are the run's)

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
            "kernels": self.kernels,
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
        if not self.group.agree(rng_digest(rng)):  # one state saved for all: they must be one (lm.model.dropout.BatchShare)
            raise RuntimeError(
                "the processes' random generators have drifted apart (a draw made by some ranks only): "
                "their dropout masks are no longer one global draw; this is a bug, please report it"
            )
        if self.group.is_main:
            save_checkpoint(
                self.checkpoint_path,
                self.checkpoint_payload(partial, rng),
                before_commit=lambda: fault_point("checkpoint", self.epochs_done),
            )

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
        self.wall_before = ckpt.get(
            "wall_seconds",
            sum(e["seconds"] + e.get("eval_seconds", 0.0) for e in self.history)
            + (self.partial.seconds if self.partial else 0.0),
        )
        self.sessions = ckpt.get("sessions", 1) + 1
        self.changes = list(ckpt.get("changes", []))


def _global_progress(progress: EpochProgress, group: Group) -> EpochProgress:
    """A mid-epoch position with every rank's streams (for the checkpoint); collective."""
    nll, tokens = group.sum([progress.nll, progress.tokens])
    state = gather_state(progress.state, group.gather_rows) if progress.state else None
    return dataclasses.replace(progress, nll=nll, tokens=int(tokens), state=state)


def _local_progress(progress: EpochProgress, group: Group, batch_size: int, device: torch.device) -> EpochProgress:
    """This rank's share of a saved mid-epoch position (any number of ranks can resume it)."""
    rows = group.rows(batch_size)
    state = state_rows(progress.state, rows, device) if progress.state else None
    if not group.is_main:  # the sums are carried by rank 0 only, so that reducing them again is right
        return dataclasses.replace(progress, nll=0.0, tokens=0, state=state)
    return dataclasses.replace(progress, state=state)


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
    model = LanguageModel.from_config(cfg.model, len(corpus.vocab)).to(device)
    model.share_batch(group.share(cfg.data.batch_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, foreach=True)
    step_options = StepOptions.from_config(cfg, objective=group.wrap(WindowLoss(model), device))
    if cfg.trainer.overwrite and group.is_main:  # only now that the new run can start: a refused one keeps the old
        clear_run_folder(out_dir)
    run = Run(
        cfg, out_dir, overrides, started, device, group, corpus, windows, valid_data, model, optimizer, step_options, config_dict
    )
    run.kernels = kernels.path(device)
    return run


def warn_if_unfused(run: Run) -> None:
    """One line on stderr when a CPU run trains on PyTorch's kernels (``LM_FUSED=0``, or no build: no
    compiler, an unwritable extension cache): the same seed then gives other numbers."""
    if run.kernels == kernels.PYTORCH and run.device.type == "cpu" and run.group.is_main:
        text = (
            f"training on PyTorch's kernels, not the fused CPU kernels ({kernels.why_not_fused()}): they draw other "
            f"dropout masks, so this seed gives other numbers than a run on the fused kernels (metrics.json records "
            f'"kernels": "{run.kernels}")'
        )
        print(f"warning: {text}", file=sys.stderr)
        log.info(text)  # and in the run's train.log


def _set_up_processes(cfg: TrainConfig) -> tuple[torch.device, Group]:
    """Threads, the device, and the process group when started by torchrun."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = select_device(cfg.trainer.device)
    if cfg.trainer.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(
            "trainer.precision=bf16: this GPU has no native bf16 (it would be emulated, slowly); use trainer.precision=fp32"
        )
    if cfg.trainer.precision == "bf16" and device.type == "cpu" and cpu_info()["bf16"] == "none":
        # a warning, not a refusal: tiny runs (tests) and a resume begun on another CPU still work
        log.warning(
            "trainer.precision=bf16: this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm BF16), so bf16 "
            "products are emulated (the medium step measured 37x slower than fp32 on an AVX2-only EPYC): "
            "use trainer.precision=fp32"
        )
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
