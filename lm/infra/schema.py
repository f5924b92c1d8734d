"""The shapes of the results files this project writes (``metrics.json``, ``ensemble.json``,
``eval.json``, ``ablation.json``), nested fields included, and the one check that reads them.

Every reader of a results file (``lm.report``, ``lm.ablation``, the ensemble's member lookup)
checks it here first, and every command that may replace such a file checks here that the file
is one it wrote (``lm.infra.outputs``): a file that fails is named with its first bad field,
never half-read. A spec is a type (``str``, ``int``, ``bool``, ``dict``, ``list``), ``NUMBER``,
``None``, a tuple of specs (any of them), a one-element list (a list of such elements;
``NonEmpty`` for at least one), or a dict of field -> spec (``Optional`` for a field older files
may lack; other fields are allowed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NUMBER = "number"  # an int or a float (a bool is neither)


@dataclass(frozen=True)
class Optional:
    """A field that may be missing (files from before it was recorded); when present, it has ``spec``."""

    spec: Any


@dataclass(frozen=True)
class NonEmpty:
    """A list of at least one element of ``spec``."""

    spec: Any


_PPL = {"ppl": NUMBER}
_HARDWARE = (None, {"cpu": Optional((str, None)), "cpu_bf16": Optional((str, None)), "gpu": Optional((str, None))})
# Where a result was made (lm.engine.runtime.provenance): read by every table's hardware column.
_PROVENANCE = {"device": Optional(str), "hardware": Optional(_HARDWARE), "threads": Optional(int)}
_EPOCH = {
    "epoch": int,
    "train_ppl": NUMBER,
    "valid_ppl": NUMBER,
    "lr": Optional(NUMBER),
    "words_per_s": Optional(NUMBER),
    "seconds": Optional(NUMBER),
    "steps": Optional(int),
}
_BOTH_PROTOCOLS = {"batched": NUMBER, "stream": NUMBER}

METRICS = {
    "name": str,
    "seed": int,
    "config": {"model": dict, "data": dict, "optim": dict, "trainer": dict},
    "epochs": [_EPOCH],
    "steps": int,
    "valid_ppl": NUMBER,
    "test_ppl": NUMBER,
    "eval": {"valid": _BOTH_PROTOCOLS, "test": _BOTH_PROTOCOLS},
    "train_seconds": NUMBER,
    "device": str,
    "completed": Optional(bool),
    "hardware": Optional(_HARDWARE),
    "threads": Optional(int),
    "overrides": Optional([str]),
    "wall_seconds": Optional(NUMBER),
    "sessions": Optional(int),
    "best_valid_ppl": Optional(NUMBER),
    "parameters": Optional(int),
    "git_commit": Optional((str, None)),
    "kernels": Optional(str),
}
# What the ablation's table reads of a run besides (lm.reporting.ablation).
ABLATION_RUN = {
    **METRICS,
    "config": {
        "model": {
            "dropout_variant": str,
            "num_layers": int,
            "hidden_size": int,
            "dropout": NUMBER,
            "dropout_embedding": NUMBER,
            "dropout_input": NUMBER,
            "dropout_recurrent": NUMBER,
            "dropout_output": NUMBER,
            "weight_drop": Optional(NUMBER),
            "tie_weights": Optional(bool),
        },
        "data": {"batch_size": int, "bptt": int},
        "optim": {"max_grad_norm": NUMBER},
        "trainer": {"epochs": int},
    },
    "epochs": NonEmpty({**_EPOCH, "lr": NUMBER, "words_per_s": NUMBER}),
    "best_valid_ppl": NUMBER,
    "parameters": int,
}
ENSEMBLE = {
    "name": str,
    "n_models": int,
    "checkpoints": [str],
    "valid_ppl": NUMBER,
    "test_ppl": NUMBER,
    "results": {"test": {"batched": _PPL}},
    "seconds": Optional(NUMBER),
    **_PROVENANCE,
}
_EVAL_RESULTS = {"valid": {"batched": _PPL}, "test": {"stream": _PPL}}
EVAL = {
    "checkpoint": str,
    "results": _EVAL_RESULTS,
    "mc_dropout": Optional((None, {"samples": int, "results": _EVAL_RESULTS, "seconds": Optional(NUMBER)})),
    **_PROVENANCE,
}
ABLATION = {"placements": dict}

# The schema of each results file, by its name.
SCHEMAS = {"metrics.json": METRICS, "ensemble.json": ENSEMBLE, "eval.json": EVAL, "ablation.json": ABLATION}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _matches_type(value: Any, spec: Any) -> bool:
    if spec is None:
        return value is None
    if spec == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, spec)


def problem(value: Any, spec: Any, where: str = "") -> str | None:
    """The first way ``value`` fails ``spec``, naming the field (``no valid 'eval.test.batched': missing``), or None."""
    if isinstance(spec, tuple):
        found = [problem(value, option, where) for option in spec]
        return None if None in found else found[-1]
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return _bad(where, value, "an object")
        for key, sub in spec.items():
            inner = f"{where}.{key}" if where else key
            if isinstance(sub, Optional):
                if key not in value:
                    continue
                sub = sub.spec
            elif key not in value:
                return f"no valid {inner!r}: missing"
            found = problem(value[key], sub, inner)
            if found:
                return found
        return None
    if isinstance(spec, NonEmpty):
        if isinstance(value, list) and not value:
            return f"no valid {where!r}: an empty list"
        spec = [spec.spec]
    if isinstance(spec, list):
        if not isinstance(value, list):
            return _bad(where, value, "a list")
        for i, item in enumerate(value):
            found = problem(item, spec[0], f"{where}[{i}]")
            if found:
                return found
        return None
    if not _matches_type(value, spec):
        return _bad(where, value, "a number" if spec == NUMBER else "null" if spec is None else _kind(spec()))
    return None


def _bad(where: str, value: Any, expected: str) -> str:
    return f"no valid {where!r}: {_kind(value)}, expected {expected}" if where else f"{_kind(value)}, expected {expected}"


class SchemaError(ValueError):
    """A results file that is not what its name says; the message names the file and the field."""


def read_json(path: Path, spec: Any) -> Any:
    """``path`` parsed as JSON and checked against ``spec``; ``SchemaError`` naming the file and
    its first bad field if it cannot be read or does not match."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:100]
        raise SchemaError(f"{path} cannot be read as JSON ({reason})") from None
    found = problem(data, spec)
    if found:
        raise SchemaError(f"{path} is not a {Path(path).name} written by this project ({found})")
    return data


def is_valid(path: Path, spec: Any) -> bool:
    """Whether ``path`` is a JSON file matching ``spec``."""
    try:
        read_json(path, spec)
    except SchemaError:
        return False
    return True
