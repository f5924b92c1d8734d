"""The README's table of config groups and keys, generated from the typed schema (lm/config.py)
and the preset files under configs/, so that it cannot drift from what the commands accept."""

from __future__ import annotations

from dataclasses import Field, fields, is_dataclass
from pathlib import Path

from lm.config import CONFIG_DIR, EvalConfig, GenerateConfig, TrainConfig

# What each group is for, in a few words (the keys and presets come from the schema and configs/).
PURPOSE = {
    "model": "cell, network size, dropout strategy and rates",
    "data": "corpus, batching, BPTT length",
    "optim": "SGD, lr schedule, clipping",
    "trainer": "epochs, seed, device, precision, resume",
    "experiment": "a paper recipe: one preset per group and the recipe's own keys",
    "ablation": "a dropout placement (make ablation)",
}


def presets(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def keys(schema: type, prefix: str = "") -> list[str]:
    """Every leaf key of a schema dataclass, dotted."""
    out = []
    for f in fields(schema):
        sub = _dataclass_type(f)
        out += keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return out


def _dataclass_type(f: Field) -> type | None:
    """The schema of a nested group (a field whose default is a dataclass), else None."""
    return f.default_factory if is_dataclass(f.default_factory) else None


def _codes(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def config_keys_table(config_dir: Path = CONFIG_DIR) -> str:
    """One row per group of ``python -m lm.train`` (its presets and keys), then the keys of
    ``lm.evaluate`` and ``lm.generate``."""
    rows = ["| group | presets (`group=NAME`) | keys (`group.key=VALUE`) |", "|---|---|---|"]
    groups = {f.name: _dataclass_type(f) for f in fields(TrainConfig)}
    for group, schema in groups.items():
        if schema is None:
            continue
        rows.append(f"| `{group}`: {PURPOSE[group]} | {_codes(presets(group, config_dir))} | {_codes(keys(schema))} |")
    for group in ("experiment", "ablation"):
        rows.append(f"| `{group}`: {PURPOSE[group]} | {_codes(presets(group, config_dir))} | (keys of the groups above) |")
    top = [f.name for f in fields(TrainConfig) if groups[f.name] is None]
    rows.append(f"| (top level) | | {_codes(top)} |")
    rows.append(f"| `python -m lm.evaluate` | | {_codes(keys(EvalConfig))} |")
    rows.append(f"| `python -m lm.generate` | | {_codes(keys(GenerateConfig))} |")
    return "\n".join(rows)
