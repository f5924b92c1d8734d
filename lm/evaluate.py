"""``python -m lm.evaluate checkpoint=PATH``: a checkpoint's valid and test perplexity under both
protocols (and Monte Carlo dropout with ``eval.mc_samples``), written to JSON."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lm.config import validate_eval
from lm.engine.evaluation import run_evaluation
from lm.infra.cli import run_hydra


def validate_eval_only(cfg: DictConfig) -> None:
    validate_eval(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


def _hydra_entry() -> None:
    run_hydra(run_evaluation, "evaluate", preflight=validate_eval_only)


if __name__ == "__main__":
    _hydra_entry()
