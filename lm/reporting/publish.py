"""``results/README.md`` and the README's results block, regenerated from the committed results,
and the same tables with a user's own runs beside them."""

from __future__ import annotations

from pathlib import Path

from lm.infra.outputs import Output, atomic_write_text, check_output_folder, claim, same_path, text_with
from lm.reporting.config_keys import config_keys_table
from lm.reporting.plots import CURVE_NAME, CURVE_SIZE, drawn_at, plot_curve
from lm.reporting.results import ResultFile, find_runs
from lm.reporting.tables import (
    GENERATED_MARK,
    averages_not_run,
    cells_table,
    comparison_table,
    ensemble_table,
    other_recipes_table,
    render,
    runs_table,
)

README_NAME = "README.md"

START, END = "<!-- results:start (make table) -->", "<!-- results:end -->"
CONFIG_KEYS_START, CONFIG_KEYS_END = "<!-- config-keys:start (make table) -->", "<!-- config-keys:end -->"


def update_readme_block(readme: Path, block: str, start: str = START, end: str = END) -> bool:
    """Replace the generated block between the markers ``start`` and ``end`` of ``readme``, if it has them."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{block}\n{end}{tail}"
    if new != text:
        atomic_write_text(readme, new)
    return True


def readme_block_source(readme: Path) -> Path:
    """The one folder a README's results block is written from: the ``results/`` beside it (``make table``)."""
    return readme.resolve().parent / "results"


def report_outputs(root: Path, runs: list[ResultFile], plots: bool = True) -> list[Output]:
    """What the report writes under ``root``: README.md, and each run's curve.png."""
    outputs = [
        Output(
            root / README_NAME,
            "--results",
            f"a README.md that lm.report generated ({GENERATED_MARK!r})",
            text_with(GENERATED_MARK),
        )
    ]
    if plots:
        outputs += [
            Output(root / r.path / CURVE_NAME, "--results", "a curve.png that lm.report drew", drawn_at(CURVE_SIZE)) for r in runs
        ]
    return outputs


def claim_report(root: Path, plots: bool = True) -> None:
    """Before any work (``lm.reproduce`` calls it before its first step): refuse a results folder whose
    README.md or a run's curve.png is not one that the report wrote."""
    check_output_folder(root, "--results")
    claim(report_outputs(root, find_runs(root) if root.is_dir() else [], plots))


def _local_runs(local: Path) -> list[ResultFile]:
    """The user's runs under ``local`` (a damaged one left out with a warning), named from ``local``'s name."""
    return [ResultFile(Path(local.name) / r.path, r.metrics) for r in find_runs(local, skip_foreign=True)]


def _local_plots(local: Path, local_runs: list[ResultFile]) -> list[Output]:
    curve = "a curve.png that lm.report drew"
    return [
        Output(local / r.path.relative_to(local.name) / CURVE_NAME, "--with-runs", curve, drawn_at(CURVE_SIZE))
        for r in local_runs
    ]


def local_report(root: Path, local: Path, local_runs: list[ResultFile] | None = None) -> str:
    """The committed runs under ``root`` as ``results/README.md`` has them, then the user's own under
    ``local`` in tables of their own: a local run never enters a committed mean (a newcomer's
    ``make train-small`` is seed 1 again). Writes only the local runs' plots."""
    local_runs = _local_runs(local) if local_runs is None else local_runs
    claim(_local_plots(local, local_runs))
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
    """``root``/README.md (and each run's curve.png with ``plots``); the marked blocks of ``readme``
    too, but only when ``root`` is the results/ folder beside it (``make table``): another folder's
    runs never replace the committed headline. Refused, before anything is written, where
    a file it would replace is not one it wrote (``report_outputs``)."""
    runs = find_runs(root)
    ensembles = find_runs(root, "ensemble.json")
    text = render(runs, ensembles, find_runs(root, "eval.json"))
    claim(report_outputs(root, runs, plots))
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / README_NAME, text)
    if readme is not None and same_path(readme_block_source(readme), root):  # make table: the README's own results/
        if runs:
            block = comparison_table(runs, every_paper_row=True)
            cells = cells_table(runs)
            if cells:
                block += "\n\nAnother cell on a paper recipe (no published number; beside our LSTM runs):\n\n" + cells
            if ensembles:
                block += "\n\n" + ensemble_table(ensembles)
            missing = averages_not_run(ensembles)
            if missing:
                block += "\n\n" + missing
            update_readme_block(readme, block)
        update_readme_block(readme, config_keys_table(), CONFIG_KEYS_START, CONFIG_KEYS_END)
    if plots:
        for r in runs:
            plot_curve(r, root / r.path / CURVE_NAME)
    return text


def make_table(root: Path, plots: bool = True, readme: Path | None = None, local: Path | None = None) -> str:
    """``python -m lm.report`` (``make table``): ``write_report`` for ``root``, then the table with the
    user's runs under ``local`` beside it (if that folder exists). Every file it would replace is
    checked before the first is written."""
    local_runs = _local_runs(local) if local is not None and local.is_dir() else None
    if local_runs is not None:
        claim(_local_plots(local, local_runs))
    text = write_report(root, plots=plots, readme=readme)
    return text if local_runs is None else local_report(root, local, local_runs)
