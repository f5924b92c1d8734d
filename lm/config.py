"""Typed schema for the Hydra configs, and the start-up check that enforces it.

The YAML files under ``configs/`` hold every value; the dataclasses here hold
only types and allowed ranges (no defaults that could disagree with the YAML).
``validate`` turns a composed ``DictConfig`` into plain typed objects or raises
``ConfigError`` with one line that names the offending key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lm.dropout import VARIANTS as DROPOUT_VARIANTS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    dropout: float = MISSING
    init_scale: float = MISSING
    dropout_variant: str = MISSING
    dropout_embedding: float = MISSING
    dropout_input: float = MISSING
    dropout_recurrent: float = MISSING
    dropout_output: float = MISSING
    weight_drop: float = MISSING
    tie_weights: bool = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    dir: str = MISSING
    download: bool = MISSING
    url: str = MISSING
    batch_size: int = MISSING
    bptt: int = MISSING


@dataclass
class OptimConfig:
    lr: float = MISSING
    lr_decay: float = MISSING
    decay_start_epoch: int = MISSING
    decay_convention: str = MISSING
    max_grad_norm: float = MISSING
    weight_decay: float = MISSING


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    seed: int = MISSING
    max_steps: Optional[int] = MISSING
    resume: Optional[str] = MISSING
    threads: int = MISSING
    device: str = MISSING
    log_every: int = MISSING
    eval_window: int = MISSING
    progress: bool = MISSING
    overwrite: bool = MISSING
    nonfinite: str = MISSING
    precision: str = MISSING


@dataclass
class TrainConfig:
    name: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class MonteCarloConfig:
    mc_samples: Optional[int] = MISSING
    mc_seed: int = MISSING


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    data_dir: Optional[str] = MISSING
    batch_size: Optional[int] = MISSING
    bptt: Optional[int] = MISSING
    eval_window: int = MISSING
    threads: int = MISSING
    device: str = MISSING
    output: Optional[str] = MISSING
    eval: MonteCarloConfig = field(default_factory=MonteCarloConfig)


DECAY_CONVENTIONS = ("tf", "lua")


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "config"
    msg = str(getattr(err, "msg", err)).strip().splitlines()[0]
    return f"{key}: {msg}"


def to_typed(cfg: DictConfig | dict, schema: type) -> Any:
    """Merge ``cfg`` into ``schema`` (rejecting unknown keys and wrong types)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def _positive_int(value: int, key: str) -> None:
    _require(value >= 1, key, "a positive integer", value)


def validate_model(m: ModelConfig) -> None:
    _positive_int(m.hidden_size, "model.hidden_size")
    _positive_int(m.num_layers, "model.num_layers")
    for key in ("dropout", "dropout_embedding", "dropout_input", "dropout_recurrent", "dropout_output", "weight_drop"):
        value = getattr(m, key)
        _require(0.0 <= value < 1.0, f"model.{key}", "in [0, 1)", value)
    _require(m.dropout_variant in DROPOUT_VARIANTS, "model.dropout_variant", f"one of {DROPOUT_VARIANTS}", m.dropout_variant)
    _require(0.0 < m.init_scale <= 1.0, "model.init_scale", "in (0, 1]", m.init_scale)


def validate(cfg: DictConfig | dict) -> TrainConfig:
    """Typed, range-checked training config; raises ``ConfigError``."""
    c: TrainConfig = to_typed(cfg, TrainConfig)
    validate_model(c.model)
    _positive_int(c.data.batch_size, "data.batch_size")
    _positive_int(c.data.bptt, "data.bptt")
    _require(bool(c.data.dir), "data.dir", "a folder path", c.data.dir)
    o = c.optim
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "a positive number", o.lr)
    _require(0.0 < o.lr_decay <= 1.0, "optim.lr_decay", "in (0, 1] (the factor applied each epoch)", o.lr_decay)
    _require(o.decay_start_epoch >= 0, "optim.decay_start_epoch", "a non-negative integer", o.decay_start_epoch)
    _require(o.decay_convention in DECAY_CONVENTIONS, "optim.decay_convention", f"one of {DECAY_CONVENTIONS}", o.decay_convention)
    _require(o.max_grad_norm > 0, "optim.max_grad_norm", "a positive number", o.max_grad_norm)
    _require(0.0 <= o.weight_decay < 1.0, "optim.weight_decay", "in [0, 1) (the fraction of every weight removed per step)", o.weight_decay)
    t = c.trainer
    _positive_int(t.epochs, "trainer.epochs")
    _require(t.seed >= 0, "trainer.seed", "a non-negative integer", t.seed)
    _require(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", "null or a positive integer", t.max_steps)
    _require(t.threads >= 0, "trainer.threads", "0 (all cores) or a positive integer", t.threads)
    _positive_int(t.log_every, "trainer.log_every")
    _positive_int(t.eval_window, "trainer.eval_window")
    _require(t.device in ("cpu", "cuda", "auto"), "trainer.device", "cpu, cuda or auto", t.device)
    _require(t.nonfinite in ("stop", "skip"), "trainer.nonfinite", "stop or skip", t.nonfinite)
    _require(t.precision in PRECISIONS, "trainer.precision", f"one of {PRECISIONS}", t.precision)
    return c


def validate_eval(cfg: DictConfig | dict) -> EvalConfig:
    c: EvalConfig = to_typed(cfg, EvalConfig)
    _require(bool(c.checkpoint), "checkpoint", "a checkpoint path", c.checkpoint)
    for key in ("batch_size", "bptt"):
        value = getattr(c, key)
        _require(value is None or value >= 1, key, "null or a positive integer", value)
    _positive_int(c.eval_window, "eval_window")
    mc = c.eval.mc_samples
    _require(mc is None or mc >= 1, "eval.mc_samples", "null or a positive integer", mc)
    _require(c.threads >= 0, "threads", "0 (all cores) or a positive integer", c.threads)
    return c


def compose(config_name: str, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` the way the command line would."""
    # hydra internals: only the commands, the report and the tests compose; the model and
    # scripts/bench.py import this module for the schema alone
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a running command: its search path is configs/ too
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)


def validate_saved(saved: dict) -> TrainConfig:
    """The typed config stored in a checkpoint, with keys added since it was written
    taken from today's defaults (``configs/train.yaml``), which reproduce the old behaviour."""
    return validate(OmegaConf.merge(compose("train", []), saved))
