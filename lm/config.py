"""Typed schema for the Hydra configs, and the start-up check that enforces it.

The YAML files under ``configs/`` hold every value; the dataclasses here hold
only types and allowed ranges (no defaults that could disagree with the YAML).
``validate`` turns a composed ``DictConfig`` into plain typed objects or raises
``ConfigError`` with one line that names the offending key. Also here: ``compose``
(a config as the command line would build it), the precedence check between an
experiment and the presets chosen beside it, and ``recipe`` (the keys a paper row
measures), so that every module that needs them imports them from below.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRECISIONS = ("fp32", "bf16")
# Where dropout goes, per variant: the model.* rates it reads (the one place that says so; lm.model
# draws the masks). zaremba: a fresh mask per step on the non-recurrent connections; variational: one
# mask per sequence on words, layer inputs, h_{t-1} and the output; recurrent: zaremba's masks plus a
# fresh one on h_{t-1}. weight_drop and tie_weights apply to every variant.
VARIANT_RATES: dict[str, tuple[str, ...]] = {
    "zaremba": ("dropout",),
    "variational": ("dropout_embedding", "dropout_input", "dropout_recurrent", "dropout_output"),
    "recurrent": ("dropout", "dropout_recurrent"),
    "none": (),
}
DROPOUT_VARIANTS = tuple(VARIANT_RATES)
# The recurrent cells, each a module of lm/model/cells/ (tests/test_cells.py holds the two lists equal).
CELLS = ("lstm", "gru")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    dropout: float = MISSING
    init_scale: float = MISSING
    cell: str = MISSING
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
    tf32: bool = MISSING
    allow_changes: List[str] = MISSING


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
    eval_window: Optional[int] = MISSING
    threads: int = MISSING
    device: str = MISSING
    output: Optional[str] = MISSING
    eval: MonteCarloConfig = field(default_factory=MonteCarloConfig)


@dataclass
class GenerateConfig:
    checkpoint: str = MISSING
    prompt: str = MISSING
    words: int = MISSING
    temperature: float = MISSING
    top_k: Optional[int] = MISSING
    seed: int = MISSING
    device: str = MISSING
    data_dir: Optional[str] = MISSING


DECAY_CONVENTIONS = ("tf", "lua")
DROPOUT_RATES = ("dropout", "dropout_embedding", "dropout_input", "dropout_recurrent", "dropout_output")
# The groups whose presets a command line swaps (optim=...); an experiment chooses among them.
PRESET_GROUPS = ("model", "data", "optim", "trainer")


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
    for key in (*DROPOUT_RATES, "weight_drop"):
        value = getattr(m, key)
        _require(0.0 <= value < 1.0, f"model.{key}", "in [0, 1)", value)
    _require(m.cell in CELLS, "model.cell", f"one of {CELLS}", m.cell)
    _require(m.dropout_variant in DROPOUT_VARIANTS, "model.dropout_variant", f"one of {DROPOUT_VARIANTS}", m.dropout_variant)
    _require(0.0 < m.init_scale <= 1.0, "model.init_scale", "in (0, 1]", m.init_scale)
    _refuse_dropout_that_lands_nowhere(m)


def rates_used(variant: str) -> tuple[str, ...]:
    """The ``model.*`` dropout rates that ``variant`` reads; under it the others have no effect."""
    return VARIANT_RATES[variant]


def unused_rates(m: ModelConfig) -> list[str]:
    """The non-zero dropout rates that the chosen variant ignores."""
    used = rates_used(m.dropout_variant)
    return [key for key in DROPOUT_RATES if key not in used and getattr(m, key) > 0]


def _refuse_dropout_that_lands_nowhere(m: ModelConfig) -> None:
    """A rate is set, but only on keys the variant ignores, while its own are all 0: the run
    would silently train without dropout (e.g. experiment=zaremba_medium model.dropout_variant=variational)."""
    used, ignored = rates_used(m.dropout_variant), unused_rates(m)
    if ignored and used and not any(getattr(m, key) > 0 for key in used):
        given = ", ".join(f"model.{key}={getattr(m, key):g}" for key in ignored)
        raise ConfigError(
            f"{given} has no effect with model.dropout_variant={m.dropout_variant}, whose own rates "
            f"({', '.join('model.' + key for key in used)}) are all 0, so the run would have no dropout: set those rates, "
            f"or choose the variant that reads {given.split('=')[0]}"
        )


def ignored_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> list[str]:
    """The dropout rates set on the command line that the chosen variant ignores (worth a warning)."""
    named = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    return [f"model.{key}" for key in unused_rates(cfg.model) if f"model.{key}" in named]


# The keys that define a recipe, i.e. what a paper row measures: the model with the dropout rates
# its variant reads, the corpus, batching and BPTT length, the optimizer and schedule, the number
# of epochs. The others say how a run was carried out (seed, threads, device, precision, data
# folder, logging, resume) and may differ between runs of one recipe.
RECIPE_KEYS = {
    "model": tuple(f.name for f in fields(ModelConfig) if f.name != "name"),
    "data": ("name", "batch_size", "bptt"),
    "optim": tuple(f.name for f in fields(OptimConfig)),
    "trainer": ("epochs",),
}


# The keys a resumed run must keep (the recipe but trainer.epochs, which may grow, and the seed and
# precision): changing one mid-run is refused unless trainer.allow_changes names it.
RESUME_KEYS = tuple(f"{g}.{k}" for g, keys in RECIPE_KEYS.items() for k in keys if (g, k) != ("trainer", "epochs")) + (
    "trainer.seed",
    "trainer.precision",
    "trainer.tf32",
)
# Keys that change how a step's windows are cut: a resume applies a change of one only at an epoch
# boundary (the position in the epoch is recomputed), and refuses it from a mid-epoch checkpoint.
EPOCH_BOUNDARY_KEYS = ("data.name", "data.batch_size", "data.bptt")
# Not a config key but a fact of the machine a resume must keep: which kernels train the run
# (the fused CPU kernels draw other dropout masks than PyTorch's; lm.kernels.path).
KERNELS = "kernels"
ALLOWED_CHANGES = (*RESUME_KEYS, KERNELS)


def resume_values(cfg: TrainConfig) -> dict[str, Any]:
    """{dotted key: value} of the keys a resume must keep (see ``RESUME_KEYS``)."""
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in RESUME_KEYS}


def recipe(cfg: TrainConfig) -> dict[str, Any]:
    """{dotted key: value} of the keys that define ``cfg``'s recipe (rates its variant ignores left out)."""
    ignored = {f"model.{key}" for key in DROPOUT_RATES if key not in rates_used(cfg.model.dropout_variant)}
    values = {f"{group}.{key}": getattr(getattr(cfg, group), key) for group, keys in RECIPE_KEYS.items() for key in keys}
    return {key: value for key, value in values.items() if key not in ignored}


def check_group_choices(overrides: Sequence[str], choices: Mapping[str, Any], config_dir: Path = CONFIG_DIR) -> None:
    """Refuse a group preset chosen on the command line (``optim=...``) that sets a key the chosen
    experiment sets too: the experiment is merged after the presets and would silently win.

    The shipped experiments set no preset's keys (tests/test_config.py holds every pair to it);
    this catches a preset or experiment added later that does."""
    experiment = choices.get("experiment")
    if not experiment:
        return
    restated = _keys_set_by(config_dir / "experiment" / f"{experiment}.yaml", prefix="")
    chosen = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    for group in PRESET_GROUPS:
        preset = choices.get(group)
        if group not in chosen or preset is None:
            continue
        clash = sorted(restated & _keys_set_by(config_dir / group / f"{preset}.yaml", prefix=f"{group}."))
        if clash:
            raise ConfigError(
                f"{group}={preset}: experiment={experiment} sets {', '.join(clash)} too and would silently win; "
                f"leave out {group}=..., or set {clash[0]}=... on the command line"
            )


def _keys_set_by(path: Path, prefix: str) -> set[str]:
    """The dotted keys a config file sets, itself or through presets of its group in its defaults list."""
    if not path.is_file():  # a preset from another search path: nothing to compare
        return set()
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    keys: set[str] = set()

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for name, child in node.items():
                walk(child, f"{key}{name}.")
        else:
            keys.add(key[:-1])

    for name, child in body.items():
        if name not in ("defaults", "hydra"):
            walk(child, f"{prefix}{name}.")
    for entry in body.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":  # another preset of the same group, e.g. optim/sgd
            keys |= _keys_set_by(path.with_name(f"{entry}.yaml"), prefix)
    return keys


# ---------------------------------------------------------------- upper bounds: what fits the machine
# Every numeric key has one, checked at start-up with the rest, so that a value no machine (or not
# this one) can hold stops the command in one line instead of a traceback deep in torch, possibly
# after hours of work.

FLOAT_MAX = 3.4028234663852886e38  # the largest fp32: the step computes in fp32
SEED_MAX = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit seed
COUNT_MAX = 2**62  # epochs, steps, window lengths: an int64 everywhere
SIZE_MAX = 2**31 - 1  # a tensor dimension (hidden size, batch, samples) the kernels index with int64 products
WORDS_MAX = 10**7  # words to generate, each kept in memory until printed


def machine_memory() -> int:
    """Bytes of physical memory (2**40 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def machine_cores() -> int:
    """Logical cores this machine has: the most threads worth starting."""
    return os.cpu_count() or 1


def fits_memory(needed: float, key: str, value: Any, what: str, hint: str) -> None:
    """Refuse a value whose ``needed`` bytes exceed this machine's memory (``what`` says for what)."""
    memory = machine_memory()
    if needed > memory:
        raise ConfigError(
            f"{key}={value} needs about {needed:.2g} bytes for {what}, more than this machine's {memory:.2g}: {hint}"
        )


def _at_most(value: Any, bound: Any, key: str, why: str) -> None:
    _require(value is None or value <= bound, key, f"at most {bound} ({why})", value)


def check_training_fits(c: TrainConfig) -> None:
    """The model and a step's activations in memory: a lower bound (the vocabulary is not known yet)."""
    m, d = c.model, c.data
    for key, value in (("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers)):
        _at_most(value, SIZE_MAX, key, "a tensor dimension")
    for key, value in (("data.batch_size", d.batch_size), ("data.bptt", d.bptt)):
        _at_most(value, SIZE_MAX, key, "a tensor dimension")
    weights = 4 * m.num_layers * (8 * m.hidden_size**2 + 8 * m.hidden_size)  # fp32 LSTM weights, embeddings left out
    fits_memory(
        3 * weights,
        "model.hidden_size",
        m.hidden_size,
        "the LSTM's weights and gradients",
        "lower model.hidden_size or model.num_layers",
    )
    activations = (
        4 * 16 * d.batch_size * d.bptt * m.num_layers * m.hidden_size
    )  # about 16 fp32 values per unit and step kept for the backward
    fits_memory(
        activations,
        "data.batch_size",
        d.batch_size,
        f"one step's activations (with data.bptt={d.bptt})",
        "lower data.batch_size or data.bptt",
    )


def _check_train_bounds(c: TrainConfig) -> None:
    o, t = c.optim, c.trainer
    _at_most(o.lr, FLOAT_MAX, "optim.lr", "the largest fp32")
    _at_most(o.max_grad_norm, FLOAT_MAX, "optim.max_grad_norm", "the largest fp32")
    _at_most(o.decay_start_epoch, COUNT_MAX, "optim.decay_start_epoch", "an int64")
    _at_most(t.epochs, COUNT_MAX, "trainer.epochs", "an int64")
    _at_most(t.max_steps, COUNT_MAX, "trainer.max_steps", "an int64")
    _at_most(t.log_every, COUNT_MAX, "trainer.log_every", "an int64")
    _at_most(t.eval_window, COUNT_MAX, "trainer.eval_window", "an int64")
    _at_most(t.seed, SEED_MAX, "trainer.seed", "torch's seeds are unsigned 64-bit")
    _at_most(t.threads, machine_cores(), "trainer.threads", "the cores of this machine")
    check_training_fits(c)


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
    _require(
        0.0 <= o.weight_decay < 1.0,
        "optim.weight_decay",
        "in [0, 1) (the fraction of every weight removed per step)",
        o.weight_decay,
    )
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
    for key in t.allow_changes:
        _require(key in ALLOWED_CHANGES, "trainer.allow_changes", f"a list of keys among {', '.join(ALLOWED_CHANGES)}", key)
    _check_train_bounds(c)
    return c


def validate_eval(cfg: DictConfig | dict) -> EvalConfig:
    c: EvalConfig = to_typed(cfg, EvalConfig)
    _require(bool(c.checkpoint), "checkpoint", "a checkpoint path", c.checkpoint)
    for key in ("batch_size", "bptt"):
        value = getattr(c, key)
        _require(value is None or value >= 1, key, "null or a positive integer", value)
    _require(c.eval_window is None or c.eval_window >= 1, "eval_window", "null or a positive integer", c.eval_window)
    mc = c.eval.mc_samples
    _require(mc is None or mc >= 1, "eval.mc_samples", "null or a positive integer", mc)
    _require(c.threads >= 0, "threads", "0 (all cores) or a positive integer", c.threads)
    _require(c.device in ("cpu", "cuda", "auto"), "device", "cpu, cuda or auto", c.device)
    for key in ("batch_size", "bptt"):
        _at_most(getattr(c, key), SIZE_MAX, key, "a tensor dimension")
    _at_most(c.eval_window, COUNT_MAX, "eval_window", "an int64")
    _at_most(mc, SIZE_MAX, "eval.mc_samples", "a tensor dimension: the samples run side by side")
    _at_most(c.eval.mc_seed, SEED_MAX, "eval.mc_seed", "torch's seeds are unsigned 64-bit")
    _require(c.eval.mc_seed >= 0, "eval.mc_seed", "a non-negative integer", c.eval.mc_seed)
    _at_most(c.threads, machine_cores(), "threads", "the cores of this machine")
    return c


def check_mc_fits(samples: int, batch_size: int, bptt: int, eval_window: int, vocab: int, hidden: int, layers: int) -> None:
    """Monte Carlo dropout runs its samples side by side (lm.engine.evaluation): refuse, before any
    evaluation, a number of samples whose logits and states cannot fit in this machine's memory."""
    rows_by_window = max(samples * batch_size * bptt, samples * eval_window)
    needed = 4 * rows_by_window * (3 * vocab + 16 * hidden * layers)
    fits_memory(needed, "eval.mc_samples", samples, "the samples' logits side by side", "lower eval.mc_samples")


def validate_generate(cfg: DictConfig | dict) -> GenerateConfig:
    c: GenerateConfig = to_typed(cfg, GenerateConfig)
    _require(bool(c.checkpoint), "checkpoint", "a checkpoint path", c.checkpoint)
    _require(c.temperature > 0 and math.isfinite(c.temperature), "temperature", "a positive number", c.temperature)
    _positive_int(c.words, "words")
    _require(c.top_k is None or c.top_k >= 1, "top_k", "null or a positive integer", c.top_k)
    _require(c.seed >= 0, "seed", "a non-negative integer", c.seed)
    _require(c.device in ("cpu", "cuda", "auto"), "device", "cpu, cuda or auto", c.device)
    _at_most(c.words, WORDS_MAX, "words", "each is kept in memory until printed")
    _at_most(c.top_k, SIZE_MAX, "top_k", "a tensor dimension")
    _at_most(c.seed, SEED_MAX, "seed", "an unsigned 64-bit seed")
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
