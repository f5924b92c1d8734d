"""A training run from start to end, as ``python -m lm.train`` runs it (any key overridable).

A run around the paper's step (``lm.engine.step``: cross-entropy summed over the BPTT window
and averaged over the batch, so lr 1 and clip 5 mean what they meant there; global
grad-norm clipping; plain SGD; an lr that is a pure function of the epoch): it claims
its folder, continues from a checkpoint when asked, trains epoch by epoch with the
hidden state reset at each epoch and evaluation, checkpoints atomically after each
epoch and on a stop signal, and ends with the final evaluation and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lm import kernels
from lm.config import ConfigError, TrainConfig, check_group_choices, validate
from lm.data.corpora import corpus_layout
from lm.engine.distributed import launch_rank
from lm.engine.epochs import fit
from lm.engine.metrics import evaluate_final, write_metrics
from lm.engine.resume import check_resumable, resume
from lm.engine.run import Run, prepare_run, warn_if_unfused
from lm.engine.run_folder import METRICS_NAME, claim_run_folder
from lm.engine.runtime import fp32_products, select_device
from lm.infra.checkpoint import RESUME_REQUIRED, RunFolderLock, load_checkpoint
from lm.infra.faults import StopRequest
from lm.infra.outputs import check_output_folder

log = logging.getLogger("lm.train")  # one logger for the whole training run (its train.log)


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
            warn_if_unfused(run)
            fit(run, stop)
            results = evaluate_final(run, stop)
        finally:
            run.group.close()
        return write_metrics(run, results)


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
    if (
        metrics.get("steps") != run.step
        or not isinstance(metrics.get("epochs"), list)
        or len(metrics["epochs"]) != run.epochs_done
    ):
        return None
    log.info("%s already holds this run, finished (%d epochs, step %d): nothing to do", run.out_dir, run.epochs_done, run.step)
    return metrics


def preflight(cfg: DictConfig) -> None:
    """Checks that must pass before anything is written: config values, an existing finished run."""
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    c = validate(job_cfg)
    check_group_choices(list(cfg.hydra.overrides.task), cfg.hydra.runtime.choices)
    device = select_device(c.trainer.device)  # cuda without a GPU
    corpus_layout(c.data.name)  # a corpus this project knows
    run_dir = Path(cfg.hydra.run.dir)
    check_output_folder(run_dir, "hydra.run.dir", ConfigError)
    if launch_rank() == 0:  # a run in progress there: say so (the other ranks of a torchrun job find rank 0's own lock)
        RunFolderLock.check_free(run_dir)
    resume_from = claim_run_folder(run_dir, c.trainer)
    if resume_from is not None:  # what can be checked without the corpus, before Hydra writes its log there
        ckpt = load_checkpoint(resume_from, required=RESUME_REQUIRED)
        check_resumable(ckpt, c, resume_from, kernels.path(device, quiet=True) if launch_rank() == 0 else None)
