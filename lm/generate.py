"""``python -m lm.generate checkpoint=PATH prompt="the company said"``: sample text from a trained
model (``lm.engine.generation``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lm.config import validate_generate
from lm.engine.generation import run_generation
from lm.infra.cli import run_hydra


def validate_generate_only(cfg: DictConfig) -> None:
    validate_generate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


def _hydra_entry() -> None:
    run_hydra(run_generation, "generate", preflight=validate_generate_only)


if __name__ == "__main__":
    _hydra_entry()
