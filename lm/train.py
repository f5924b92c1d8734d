"""``python -m lm.train experiment=zaremba_small``: train, evaluate and write ``metrics.json``
(``lm.engine.training``); any key can be overridden, ``-m`` sweeps."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lm.config import check_group_choices, validate
from lm.engine.training import preflight, train
from lm.infra.cli import run_hydra


def _train_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    check_group_choices(list(hydra_cfg.overrides.task), hydra_cfg.runtime.choices)  # also each job of a sweep
    train(validate(cfg), hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))


def _hydra_entry() -> None:
    run_hydra(_train_job, "train", preflight=preflight)


if __name__ == "__main__":
    _hydra_entry()
