"""``python -m lm.report`` (``make table``): our perplexities beside the paper's Table 1.

Reads every ``metrics.json`` under ``results/`` (the committed runs, any depth),
writes ``results/README.md`` (a table generated from the runs' JSON, never
edited by hand: same inputs, same bytes) and a learning-curve plot next to each
run. A run is set beside a paper row when its recipe (``lm.config.recipe`` of its
resolved config) is that of the row's experiment preset, whatever its name; a run
named after a paper experiment with another recipe is listed apart. ``--with-runs runs`` also prints the table with your own runs from
``runs/`` (sweeps included) beside them; ``results/README.md`` keeps only the
committed runs.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm.checkpoint import atomic_write, atomic_write_text
from lm.cli import ArgumentParser, check_output_folder, guarded
from lm.config import ConfigError, compose, recipe, validate, validate_saved
from lm.data import DataError

# Zaremba et al. 2014, Table 1 (valid, test), keyed by our experiment names.
PAPER_TABLE_1: dict[str, tuple[str, float, float]] = {
    "zaremba_small": ("non-regularized LSTM (small)", 120.7, 114.5),
    "zaremba_medium": ("medium regularized LSTM", 86.2, 82.7),
    "zaremba_large": ("large regularized LSTM", 82.2, 78.4),
}
# Follow-ups that PAPER.md records (valid, test), for the presets that reproduce them.
FOLLOW_UPS: dict[str, tuple[str, float, float]] = {
    "gal_medium": ("Gal & Ghahramani 2016, variational (medium)", 81.9, 79.7),
    "gal_large": ("Gal & Ghahramani 2016, variational (large)", 77.9, 75.2),
}
REFERENCE_ROWS = {**PAPER_TABLE_1, **FOLLOW_UPS}  # every preset with a published number
# Gal & Ghahramani's test perplexity with Monte Carlo dropout (PAPER.md), per preset.
PAPER_MC_TEST: dict[str, float] = {"gal_medium": 78.6, "gal_large": 73.4}
# Table 1, model averaging: {experiment: [(number of models, valid, test), ...]}.
PAPER_AVERAGES: dict[str, list[tuple[int, float, float]]] = {
    "zaremba_small": [(2, 100.4, 96.1), (5, 87.9, 84.1), (10, 83.5, 80.0)],
    "zaremba_medium": [(2, 80.6, 77.0), (5, 76.7, 73.3), (10, 75.2, 72.0)],
    "zaremba_large": [(2, 76.9, 73.6), (10, 72.8, 69.5), (38, 71.9, 68.7)],
}
CURVE_NAME = "curve.png"


@dataclass
class Run:
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
        except ConfigError:
            return None


@functools.cache
def reference_recipes() -> dict[str, dict[str, Any]]:
    """{experiment: its recipe} for every preset with a published number."""
    return {name: recipe(validate(compose("train", [f"experiment={name}"]))) for name in REFERENCE_ROWS}


def paper_experiment(run: Run) -> str | None:
    """The experiment with a published number whose recipe the run's is, if any."""
    return next((name for name, ref in reference_recipes().items() if run.recipe == ref), None)


def recipe_difference(run: Run, experiment: str) -> str:
    """How a run's recipe differs from ``experiment``'s, in words."""
    if run.recipe is None:
        return "its config no longer validates"
    ref = reference_recipes()[experiment]
    keys = sorted(set(ref) | set(run.recipe))
    return ", ".join(f"{k} {run.recipe.get(k, '-')} (recipe: {ref.get(k, '-')})" for k in keys if run.recipe.get(k) != ref.get(k))


# The fields the tables read, per file: a file without them was not written by lm.train / lm.ensemble.
REQUIRED_FIELDS = {
    "metrics.json": {"name": str, "seed": int, "config": dict, "epochs": list, "steps": int, "valid_ppl": float,
                     "test_ppl": float, "eval": dict, "train_seconds": float, "device": str},
    "ensemble.json": {"name": str, "n_models": int, "checkpoints": list, "valid_ppl": float, "test_ppl": float, "results": dict},
    "eval.json": {"checkpoint": str, "results": dict},
}


def read_run_file(file: Path) -> dict[str, Any]:
    """A metrics.json or ensemble.json, checked to hold what the tables read; ``DataError`` if not."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{file} cannot be read as JSON ({str(err).splitlines()[0][:100]}): remove it or move it out of the folder") from None
    fields = REQUIRED_FIELDS.get(file.name, {})
    bad = [k for k, kind in fields.items() if not isinstance(data, dict) or not isinstance(data.get(k), (int, float) if kind is float else kind)]
    if bad:
        raise DataError(f"{file} is not a {file.name} written by this project (no valid {bad[0]!r}): remove it or move it out of the folder")
    return data


def find_runs(root: Path, filename: str = "metrics.json", skip_foreign: bool = False) -> list[Run]:
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
        runs.append(Run(file.parent.relative_to(root), metrics))
    return runs


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return _fmt(values[0]) if values else ""
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _minutes(seconds: float | None) -> str:
    """Minutes to one decimal; blank for records from before their time was kept."""
    return "" if seconds is None else f"{seconds / 60:.1f}"


def _hardware(m: dict[str, Any]) -> str:
    """Where a run trained: the GPU, or the CPU model with its bf16 instructions and threads
    (runs from before metrics.json recorded the model say so)."""
    hw = m.get("hardware") or {}
    if m.get("device", "cpu").startswith("cuda"):
        return hw.get("gpu") or m["device"]
    threads = f"{m['threads']} thr" if "threads" in m else ""
    if not hw.get("cpu"):
        return ", ".join(x for x in ("cpu (model not recorded)", threads) if x)
    return ", ".join(x for x in (f"{hw['cpu']}, {hw.get('cpu_bf16', '?')}", threads) if x)


# Runs from before metrics.json summed the wall time over resumed processes ("sessions") recorded
# only the last process's; where that is shorter than the training itself, the table says so.
LAST_PROCESS_MARK = "†"
LAST_PROCESS_NOTE = (f"{LAST_PROCESS_MARK} wall time of the run's last process only: it was resumed before metrics.json "
                     "summed the wall time over processes (train min covers every process).")


def _wall_hours(m: dict[str, Any]) -> str:
    if not isinstance(m.get("wall_seconds"), (int, float)):
        return ""
    last_only = "sessions" not in m and m["wall_seconds"] < m.get("train_seconds", 0)
    return f"{m['wall_seconds'] / 3600:.2f}" + (f" {LAST_PROCESS_MARK}" if last_only else "")


def runs_table(runs: list[Run]) -> str:
    header = (
        "| run | seed | epochs | valid (batched) | test (paper protocol) | test (batched) | train min | wall h | hardware | overrides |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in runs:
        m = r.metrics
        overrides = " ".join(o for o in m.get("overrides", []) if not o.startswith(("trainer.progress", "trainer.resume"))) or ""
        epochs = str(len(m["epochs"])) if m.get("completed", True) else f"partial ({m['steps']} steps)"
        rows.append(
            f"| `{r.path.as_posix()}` | {m['seed']} | {epochs} | {_fmt(m['valid_ppl'])} | {_fmt(m['test_ppl'])} | "
            f"{_fmt(m['eval']['test']['batched'])} | {_minutes(m['train_seconds'])} | {_wall_hours(m)} | {_hardware(m)} | {overrides} |"
        )
    if any(LAST_PROCESS_MARK in row for row in rows):
        rows += ["", LAST_PROCESS_NOTE]
    return "\n".join([header, *rows])


def comparison_table(runs: list[Run], every_paper_row: bool = False) -> str:
    """One row per paper experiment: mean ± std over the completed runs of its recipe, the paper's numbers, the gap.

    Rows follow the paper (Table 1, then the follow-ups); with ``every_paper_row`` the rows
    no run has reached yet are listed too, so the committed table shows what is still missing.
    Runs of other recipes (the ablation's placements, a changed schedule under a paper
    experiment's name) are not compared; they are listed per run."""
    by_experiment: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        experiment = paper_experiment(r) if r.metrics.get("completed", True) else None  # smoke runs are listed below
        if experiment is not None:
            by_experiment[experiment].append(r)
    header = (
        "| experiment | runs | valid (ours) | test (ours, paper protocol) | paper row | paper valid | paper test | gap test |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, (label, p_valid, p_test) in REFERENCE_ROWS.items():
        group = by_experiment.get(name, [])
        if not group:
            if every_paper_row:
                rows.append(f"| {name} | 0 | not run yet | | {label} | {p_valid:.1f} | {p_test:.1f} | |")
            continue
        valid = [r.metrics["valid_ppl"] for r in group]
        test = [r.metrics["test_ppl"] for r in group]
        rows.append(
            f"| {name} | {len(group)} | {_mean_std(valid)} | {_mean_std(test)} | {label} | {p_valid:.1f} | {p_test:.1f} | "
            f"{statistics.mean(test) - p_test:+.2f} |"
        )
    return "\n".join([header, *rows])


def other_recipes_table(runs: list[Run]) -> str | None:
    """The completed runs named after a paper experiment whose recipe is none of them; None if there are none."""
    apart = [r for r in runs if r.metrics.get("completed", True) and r.name in REFERENCE_ROWS and paper_experiment(r) is None]
    if not apart:
        return None
    header = "| run | name | differs from that experiment's recipe in |\n|---|---|---|"
    return "\n".join([header, *(f"| `{r.path.as_posix()}` | {r.name} | {recipe_difference(r, r.name)} |" for r in apart)])


def ensemble_experiment(ensemble: Run) -> str | None:
    """The paper experiment whose recipe every member has (read from the metrics.json beside each
    member's checkpoint), or None if a member's run is not found or the recipes differ."""
    experiments = set()
    for checkpoint in ensemble.metrics["checkpoints"]:
        metrics = Path(checkpoint).parent / "metrics.json"  # as the ensemble was given them: from the repository root
        if not metrics.is_file():
            return None
        try:
            experiments.add(paper_experiment(Run(metrics.parent, read_run_file(metrics))))
        except DataError:
            return None
    return experiments.pop() if len(experiments) == 1 else None


def paper_average(experiment: str | None, n_models: int) -> str:
    """The paper's valid / test for an average of ``n_models`` models of ``experiment``; where it
    reports none of that size, the sizes it does report."""
    averages = PAPER_AVERAGES.get(experiment or "", [])
    same = [f"{v:.1f} / {t:.1f}" for n, v, t in averages if n == n_models]
    if same:
        return same[0]
    return f"none of {n_models} (it averages {', '.join(str(n) for n, _, _ in averages)})" if averages else ""


def ensemble_table(ensembles: list[Run]) -> str:
    header = (
        "| ensemble | models | valid (batched) | test (paper protocol) | test (batched) | eval min | hardware "
        "| paper, same number of models: valid / test |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for e in sorted(ensembles, key=lambda e: (e.name, e.metrics["n_models"], e.path.as_posix())):
        m = e.metrics
        paper = paper_average(ensemble_experiment(e), m["n_models"])
        rows.append(
            f"| `{e.path.as_posix()}` ({e.name}) | {m['n_models']} | {_fmt(m['valid_ppl'])} | {_fmt(m['test_ppl'])} | "
            f"{_fmt(m['results']['test']['batched']['ppl'])} | {_minutes(m.get('seconds'))} | {_hardware(m)} "
            f"| {paper} |"
        )
    return "\n".join([header, *rows])


def averages_not_run(ensembles: list[Run]) -> str | None:
    """The paper's model averages that no ensemble reproduces yet: a heading and one line per experiment."""
    done = {(ensemble_experiment(e), e.metrics["n_models"]) for e in ensembles}
    lines = []
    for experiment, averages in PAPER_AVERAGES.items():
        missing = [(n, t) for n, _, t in averages if (experiment, n) not in done]
        if missing:
            lines.append(f"- {experiment}: averages of " + ", ".join(str(n) for n, _ in missing) + " models (paper test "
                         + " / ".join(f"{t:.1f}" for _, t in missing) + ")")
    return "\n".join(["Not run yet, of the paper's averages:", "", *lines]) if lines else None


def mc_dropout_table(evals: list[Run], runs: list[Run]) -> str | None:
    """Runs evaluated with Monte Carlo dropout (``lm.evaluate eval.mc_samples=K``, eval.json beside
    metrics.json): standard and MC perplexity side by side, with Gal's MC number where there is one."""
    by_path = {r.path: r for r in runs}
    rows = []
    for e in evals:
        mc = e.metrics.get("mc_dropout")
        if not isinstance(mc, dict):
            continue
        run = by_path.get(e.path)
        experiment = paper_experiment(run) if run is not None else None
        std, mc_res = e.metrics["results"], mc["results"]
        paper = PAPER_MC_TEST.get(experiment or "")
        rows.append(
            f"| `{e.path.as_posix()}` | {experiment or ''} | {mc['samples']} | {_fmt(std['valid']['batched']['ppl'])} | "
            f"{_fmt(mc_res['valid']['batched']['ppl'])} | {_fmt(std['test']['stream']['ppl'])} | {_fmt(mc_res['test']['stream']['ppl'])} | "
            f"{'' if paper is None else f'{paper:.1f}'} | {_minutes(mc.get('seconds'))} | {_hardware(e.metrics)} |"
        )
    if not rows:
        return None
    header = ("| run | experiment | samples | valid | valid (MC) | test (paper protocol) | test (MC) | paper test (MC) "
              "| MC eval min | hardware |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([header, *rows])


def render(runs: list[Run], ensembles: list[Run] | None = None, evals: list[Run] | None = None) -> str:
    parts = [
        "# Results",
        "",
        "Generated by `make table` (`python -m lm.report`) from the `metrics.json` files below; do not edit by hand.",
        "Validation perplexity is measured on batched streams (the paper's per-epoch protocol); test perplexity",
        "under the paper's protocol: one stream, batch 1, state carried, every token after the first predicted.",
        "",
    ]
    if not runs:
        parts += ["No runs yet: `make train-small` makes one.", ""]
        return "\n".join(parts)
    parts += ["## Against the paper (Zaremba et al. 2014, Table 1)", "",
              "Mean ± standard deviation over the completed runs of each paper experiment (runs cut short by",
              "`trainer.max_steps`, and runs of studies without a paper number, are listed under Runs only).", "",
              comparison_table(runs, every_paper_row=True), ""]
    apart = other_recipes_table(runs)
    if apart:
        parts += ["Not compared: runs named after a paper experiment whose recipe (the resolved config) is another.", "",
                  apart, ""]
    parts += ["## Runs", "", runs_table(runs), "",
              "Learning curves: `curve.png` in each run folder.", ""]
    if ensembles:
        parts += ["## Model averaging (mean of the members' probabilities per token)", "", ensemble_table(ensembles), ""]
    missing = averages_not_run(ensembles or [])
    if missing:
        parts += [missing, ""]
    mc = mc_dropout_table(evals or [], runs)
    if mc:
        parts += ["## Monte Carlo dropout (dropout left on at evaluation, probabilities averaged over the samples)", "", mc, ""]
    return "\n".join(parts)


def new_figure(figsize: tuple[float, float]):
    """A (fig, ax) pair drawn off-screen (no display needed)."""
    import matplotlib  # heavy: loaded only when a plot is drawn (--no-plots and the tables do without)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=100)


def save_epoch_plot(fig, ax, title: str, ylabel: str, out: Path) -> None:
    """Perplexity per epoch on a log axis, written atomically as PNG (same inputs, same bytes)."""
    import matplotlib.pyplot as plt  # heavy: see new_figure

    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))
    plt.close(fig)


def plot_curve(run: Run, out: Path) -> None:
    epochs = run.metrics["epochs"]
    xs = [e["epoch"] for e in epochs]
    fig, ax = new_figure((6, 4))
    ax.plot(xs, [e["train_ppl"] for e in epochs], marker="o", label="train")
    ax.plot(xs, [e["valid_ppl"] for e in epochs], marker="o", label="valid")
    paper = PAPER_TABLE_1.get(paper_experiment(run) or "")
    if paper:
        ax.axhline(paper[1], color="gray", linestyle="--", linewidth=1, label=f"paper valid {paper[1]}")
    save_epoch_plot(fig, ax, f"{run.name} (seed {run.metrics['seed']})", "perplexity", out)


START, END = "<!-- results:start (make table) -->", "<!-- results:end -->"


def update_readme_block(readme: Path, block: str) -> bool:
    """Replace the generated block between the markers of ``readme``, if it has them."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(readme, f"{head}{START}\n{block}\n{END}{tail}")
    return True


def local_report(root: Path, local: Path) -> str:
    """The committed runs under ``root`` as ``results/README.md`` has them, then the user's own under
    ``local`` in tables of their own: a local run never enters a committed mean (a newcomer's
    ``make train-small`` is seed 1 again). Writes only the local runs' plots."""
    local_runs = [Run(Path(local.name) / r.path, r.metrics) for r in find_runs(local, skip_foreign=True)]
    for r in local_runs:
        plot_curve(r, local / r.path.relative_to(local.name) / CURVE_NAME)
    text = render(find_runs(root), find_runs(root, "ensemble.json"), find_runs(root, "eval.json"))
    if not local_runs:
        return text
    compared = comparison_table(local_runs)
    parts = [text, f"# Your runs ({local}/), apart from the committed ones", ""]
    if compared.count("\n") > 1:  # a row beyond the header
        parts += ["The same comparison for your runs alone (each group's mean is over your runs only).", "", compared, ""]
    else:
        parts += ["None of them is a completed run of a paper recipe yet, so none is set beside the paper.", ""]
    apart = other_recipes_table(local_runs)
    if apart:
        parts += [apart, ""]
    parts += [runs_table(local_runs), ""]
    return "\n".join(parts)


def write_report(root: Path, plots: bool = True, readme: Path | None = None) -> str:
    runs = find_runs(root)
    ensembles = find_runs(root, "ensemble.json")
    text = render(runs, ensembles, find_runs(root, "eval.json"))
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "README.md", text)
    if readme is not None and runs:
        block = comparison_table(runs, every_paper_row=True)
        if ensembles:
            block += "\n\n" + ensemble_table(ensembles)
        missing = averages_not_run(ensembles)
        if missing:
            block += "\n\n" + missing
        update_readme_block(readme, block)
    if plots:
        for r in runs:
            plot_curve(r, root / r.path / CURVE_NAME)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m lm.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="folder searched for metrics.json (default: results)")
    parser.add_argument("--no-plots", action="store_true", help="skip the learning-curve plots")
    parser.add_argument("--readme", default="README.md", help="README whose marked results block is refreshed (if it has one)")
    parser.add_argument("--with-runs", metavar="DIR", help="print the table with your own runs in DIR too (results/README.md keeps only the committed runs)")
    args = parser.parse_args(argv)

    def body() -> None:
        results = Path(args.results)
        if results.exists() and not results.is_dir():
            raise DataError(f"--results: {results} is a file, not a folder of runs")
        check_output_folder(results, "--results")
        text = write_report(results, plots=not args.no_plots, readme=Path(args.readme))
        if args.with_runs and Path(args.with_runs).is_dir():
            text = local_report(results, Path(args.with_runs))
        print(text)

    guarded(body)


if __name__ == "__main__":
    main()
