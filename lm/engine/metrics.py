"""The end of a run: valid and test perplexity under both protocols, and ``metrics.json`` (the
numbers, the history and how they were made)."""

from __future__ import annotations

import logging
import math
import platform
from typing import Any

from lm.engine.evaluation import PROTOCOL_DESCRIPTIONS, evaluate_all
from lm.engine.run import Run
from lm.engine.run_folder import METRICS_NAME
from lm.engine.runtime import precision_record, provenance
from lm.engine.step import graphs_not_applicable, graphs_status
from lm.infra.checkpoint import atomic_write_json
from lm.infra.faults import NonFiniteError, StopRequest, fault_point, interrupt
from lm.model.cells import CELLS
from lm.model.language_model import count_parameters

log = logging.getLogger("lm.train")  # one logger for the whole training run (its train.log)


def evaluate_final(run: Run, stop: StopRequest | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Valid and test perplexity under both protocols (``lm.evaluate``). Every epoch is in the
    checkpoint by now, so a stop signal here ends the run at once (``TrainingInterrupted``);
    a non-finite perplexity is a ``NonFiniteError`` (no metrics.json is written)."""
    log.info("final evaluation (valid and test, both protocols)")
    where = "during the final evaluation (every trained step is in the checkpoint)"
    if stop is not None:
        stop.on_signal = lambda: interrupt(stop, where, run.checkpoint_path)
        if stop:
            interrupt(stop, where, run.checkpoint_path)
    try:
        fault_point("final", 1)
        results = evaluate_all(run.model, run.corpus, run.cfg.data.batch_size, run.cfg.data.bptt, run.cfg.trainer.eval_window)
    finally:
        if stop is not None:
            stop.on_signal = None
    bad = [f"{s} {p} {r['ppl']:g}" for s, by_p in results.items() for p, r in by_p.items() if not math.isfinite(r["ppl"])]
    if bad:
        raise NonFiniteError(
            f"final evaluation: non-finite perplexity ({', '.join(bad)}); metrics.json not written (try a lower optim.lr)"
        )
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
        "completed": len(history) == run.cfg.trainer.epochs
        and all(e["steps"] == e.get("windows", len(run.windows)) for e in history),
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
        "kernels": run.kernels,  # fused or pytorch (lm.kernels.path): the same seed gives other numbers on each
        "step_paths": step_paths(run),
        "processes": run.group.world_size,
        "platform": platform.platform(),
    }


def step_paths(run: Run) -> dict[str, Any]:
    """How this process ran the training step: replayed as a CUDA graph or eagerly (and why), and on a
    GPU whether the masked or bf16 layers' time loop ran compiled or fell back to the eager loop (about
    5x slower) and why. A fallback is one warning line in the log; here it stays with the numbers."""
    graphs = graphs_status(run.model)
    if graphs is None:
        reason = graphs_not_applicable(run.device, run.optimizer, run.step_options, run.step_options.objective, copies=False)
        graphs = {"replayed_steps": 0, "not_used": reason or "no step trained in this process"}
    return {"cuda_graphs": graphs, "time_loop": CELLS[run.model.cell].compiled_status() if run.device.type == "cuda" else None}


def write_metrics(run: Run, results: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """``metrics.json`` (rank 0, atomically); returns its content."""
    metrics = metrics_record(run, results)
    path = run.out_dir / METRICS_NAME
    if run.group.is_main:
        atomic_write_json(path, metrics)
    log.info("valid ppl %.2f (batched)  test ppl %.2f (paper protocol)  -> %s", metrics["valid_ppl"], metrics["test_ppl"], path)
    return metrics
