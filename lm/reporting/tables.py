"""The Markdown tables of ``results/README.md``: our perplexities beside the paper's, per run, per
model average and under Monte Carlo dropout (same inputs, same bytes)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lm.infra.errors import DataError
from lm.reporting.paper import PAPER_AVERAGES, PAPER_MC_TEST, REFERENCE_ROWS
from lm.reporting.results import ResultFile, paper_experiment, read_run_file, recipe_difference


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
LAST_PROCESS_NOTE = (
    f"{LAST_PROCESS_MARK} wall time of the run's last process only: it was resumed before metrics.json "
    "summed the wall time over processes (train min covers every process)."
)


def _wall_hours(m: dict[str, Any]) -> str:
    if not isinstance(m.get("wall_seconds"), (int, float)):
        return ""
    last_only = "sessions" not in m and m["wall_seconds"] < m.get("train_seconds", 0)
    return f"{m['wall_seconds'] / 3600:.2f}" + (f" {LAST_PROCESS_MARK}" if last_only else "")


def runs_table(runs: list[ResultFile]) -> str:
    header = (
        "| run | seed | epochs | valid (batched) | test (paper protocol) | test (batched) | train min | wall h | hardware "
        "| overrides |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in runs:
        m = r.metrics
        overrides = " ".join(o for o in m.get("overrides", []) if not o.startswith(("trainer.progress", "trainer.resume"))) or ""
        epochs = str(len(m["epochs"])) if m.get("completed", True) else f"partial ({m['steps']} steps)"
        rows.append(
            f"| `{r.path.as_posix()}` | {m['seed']} | {epochs} | {_fmt(m['valid_ppl'])} | {_fmt(m['test_ppl'])} | "
            f"{_fmt(m['eval']['test']['batched'])} | {_minutes(m['train_seconds'])} | {_wall_hours(m)} | {_hardware(m)} "
            f"| {overrides} |"
        )
    if any(LAST_PROCESS_MARK in row for row in rows):
        rows += ["", LAST_PROCESS_NOTE]
    return "\n".join([header, *rows])


def comparison_table(runs: list[ResultFile], every_paper_row: bool = False) -> str:
    """One row per paper experiment: mean ± std over the completed runs of its recipe, the paper's numbers, the gap.

    Rows follow the paper (Table 1, then the follow-ups); with ``every_paper_row`` the rows
    no run has reached yet are listed too, so the committed table shows what is still missing.
    Runs of other recipes (the ablation's placements, a changed schedule under a paper
    experiment's name) are not compared; they are listed per run."""
    by_experiment: dict[str, list[ResultFile]] = defaultdict(list)
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


def other_recipes_table(runs: list[ResultFile]) -> str | None:
    """The completed runs named after a paper experiment whose recipe is none of them; None if there are none."""
    apart = [r for r in runs if r.metrics.get("completed", True) and r.name in REFERENCE_ROWS and paper_experiment(r) is None]
    if not apart:
        return None
    header = "| run | name | differs from that experiment's recipe in |\n|---|---|---|"
    return "\n".join([header, *(f"| `{r.path.as_posix()}` | {r.name} | {recipe_difference(r, r.name)} |" for r in apart)])


def ensemble_experiment(ensemble: ResultFile) -> str | None:
    """The paper experiment whose recipe every member has (read from the metrics.json beside each
    member's checkpoint), or None if a member's run is not found or the recipes differ."""
    experiments = set()
    for checkpoint in ensemble.metrics["checkpoints"]:
        metrics = Path(checkpoint).parent / "metrics.json"  # as the ensemble was given them: from the repository root
        if not metrics.is_file():
            return None
        try:
            experiments.add(paper_experiment(ResultFile(metrics.parent, read_run_file(metrics))))
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


def ensemble_table(ensembles: list[ResultFile]) -> str:
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


def averages_not_run(ensembles: list[ResultFile]) -> str | None:
    """The paper's model averages that no ensemble reproduces yet: a heading and one line per experiment."""
    done = {(ensemble_experiment(e), e.metrics["n_models"]) for e in ensembles}
    lines = []
    for experiment, averages in PAPER_AVERAGES.items():
        missing = [(n, t) for n, _, t in averages if (experiment, n) not in done]
        if missing:
            lines.append(
                f"- {experiment}: averages of "
                + ", ".join(str(n) for n, _ in missing)
                + " models (paper test "
                + " / ".join(f"{t:.1f}" for _, t in missing)
                + ")"
            )
    return "\n".join(["Not run yet, of the paper's averages:", "", *lines]) if lines else None


def mc_dropout_table(evals: list[ResultFile], runs: list[ResultFile]) -> str | None:
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
            f"{_fmt(mc_res['valid']['batched']['ppl'])} | {_fmt(std['test']['stream']['ppl'])} | "
            f"{_fmt(mc_res['test']['stream']['ppl'])} | "
            f"{'' if paper is None else f'{paper:.1f}'} | {_minutes(mc.get('seconds'))} | {_hardware(e.metrics)} |"
        )
    if not rows:
        return None
    header = (
        "| run | experiment | samples | valid | valid (MC) | test (paper protocol) | test (MC) | paper test (MC) "
        "| MC eval min | hardware |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([header, *rows])


def render(runs: list[ResultFile], ensembles: list[ResultFile] | None = None, evals: list[ResultFile] | None = None) -> str:
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
    parts += [
        "## Against the paper (Zaremba et al. 2014, Table 1)",
        "",
        "Mean ± standard deviation over the completed runs of each paper experiment (runs cut short by",
        "`trainer.max_steps`, and runs of studies without a paper number, are listed under Runs only).",
        "",
        comparison_table(runs, every_paper_row=True),
        "",
    ]
    apart = other_recipes_table(runs)
    if apart:
        parts += [
            "Not compared: runs named after a paper experiment whose recipe (the resolved config) is another.",
            "",
            apart,
            "",
        ]
    parts += ["## Runs", "", runs_table(runs), "", "Learning curves: `curve.png` in each run folder.", ""]
    if ensembles:
        parts += ["## Model averaging (mean of the members' probabilities per token)", "", ensemble_table(ensembles), ""]
    missing = averages_not_run(ensembles or [])
    if missing:
        parts += [missing, ""]
    mc = mc_dropout_table(evals or [], runs)
    if mc:
        parts += ["## Monte Carlo dropout (dropout left on at evaluation, probabilities averaged over the samples)", "", mc, ""]
    return "\n".join(parts)
