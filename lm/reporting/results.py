"""The committed results read back: every metrics.json, ensemble.json or eval.json under a folder,
checked to hold what the tables read, and the paper experiment whose recipe a run has."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from lm.config import ConfigError, compose, recipe, validate, validate_saved
from lm.infra.errors import DataError
from lm.infra.schema import SCHEMAS, SchemaError, read_json
from lm.reporting.paper import REFERENCE_ROWS


@dataclass
class ResultFile:
    """One results file read back (a run's metrics.json, an ensemble.json or an eval.json)."""

    path: Path  # folder of metrics.json, relative to the results root
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        return self.metrics["name"]

    @functools.cached_property
    def recipe(self) -> dict[str, Any] | None:
        """The recipe of the run's resolved config (keys added since it ran take today's defaults);
        None if that config no longer validates."""
        try:
            return recipe(validate_saved(self.metrics["config"]))
        except (ConfigError, OmegaConfBaseException):
            return None


@functools.cache
def reference_recipes() -> dict[str, dict[str, Any]]:
    """{experiment: its recipe} for every preset with a published number."""
    return {name: recipe(validate(compose("train", [f"experiment={name}"]))) for name in REFERENCE_ROWS}


def paper_experiment(run: ResultFile) -> str | None:
    """The experiment with a published number whose recipe the run's is, if any."""
    return next((name for name, ref in reference_recipes().items() if run.recipe == ref), None)


PAPER_CELL = "lstm"  # every row of the paper's Table 1 and its follow-ups


def other_cell_experiment(run: ResultFile) -> tuple[str, str] | None:
    """(experiment, cell) for a run whose recipe is a published experiment's but for its cell (a GRU
    trained on the small recipe), else None: no paper number, but our LSTM runs of that recipe."""
    if run.recipe is None or run.recipe.get("model.cell", PAPER_CELL) == PAPER_CELL:
        return None
    as_paper = {**run.recipe, "model.cell": PAPER_CELL}
    name = next((name for name, ref in reference_recipes().items() if as_paper == ref), None)
    return None if name is None else (name, run.recipe["model.cell"])


def recipe_difference(run: ResultFile, experiment: str) -> str:
    """How a run's recipe differs from ``experiment``'s, in words."""
    if run.recipe is None:
        return "its config no longer validates"
    ref = reference_recipes()[experiment]
    keys = sorted(set(ref) | set(run.recipe))
    return ", ".join(f"{k} {run.recipe.get(k, '-')} (recipe: {ref.get(k, '-')})" for k in keys if run.recipe.get(k) != ref.get(k))


def read_run_file(file: Path, schema: Any = None) -> dict[str, Any]:
    """A metrics.json, ensemble.json or eval.json, checked against its schema (``lm.infra.schema``:
    every field the tables read, nested ones included; ``schema`` for a reader that reads more);
    ``DataError`` naming the file and its first bad field if it does not match."""
    try:
        return read_json(file, schema if schema is not None else SCHEMAS.get(file.name, dict))
    except SchemaError as err:
        raise DataError(f"{err}: remove it or move it out of the folder") from None


def find_runs(root: Path, filename: str = "metrics.json", skip_foreign: bool = False) -> list[ResultFile]:
    """Every ``filename`` under ``root``; one that is not ours is an error, or with ``skip_foreign``
    (the user's own runs/) a warning line and left out."""
    runs = []
    for file in sorted(root.rglob(filename)):
        try:
            metrics = read_run_file(file)
        except DataError as err:
            if not skip_foreign:
                raise
            print(f"warning: left out of the table: {err}", file=sys.stderr)
            continue
        runs.append(ResultFile(file.parent.relative_to(root), metrics))
    return runs
