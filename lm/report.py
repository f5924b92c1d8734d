"""``python -m lm.report`` (``make table``): our perplexities beside the paper's Table 1.

Reads every ``metrics.json`` under ``results/`` (the committed runs, any depth),
writes ``results/README.md`` (a table generated from the runs' JSON, never
edited by hand: same inputs, same bytes) and a learning-curve plot next to each
run. A run is set beside a paper row when its recipe (``lm.config.recipe`` of its
resolved config) is that of the row's experiment preset, whatever its name; a run
named after a paper experiment with another recipe is listed apart. ``--with-runs runs``
also prints the table with your own runs from ``runs/`` (sweeps included) beside them;
``results/README.md`` keeps only the committed runs.
"""

from __future__ import annotations

from pathlib import Path

from lm.infra.cli import ArgumentParser, guarded
from lm.infra.errors import DataError
from lm.reporting.publish import make_table


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m lm.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="folder searched for metrics.json (default: results)")
    parser.add_argument("--no-plots", action="store_true", help="skip the learning-curve plots")
    parser.add_argument(
        "--readme",
        default="README.md",
        help="README whose marked results block is refreshed (if it has one), from the results/ folder beside it only",
    )
    parser.add_argument(
        "--with-runs",
        metavar="DIR",
        help="print the table with your own runs in DIR too (results/README.md keeps only the committed runs)",
    )
    args = parser.parse_args(argv)

    def body() -> None:
        results = Path(args.results)
        if results.exists() and not results.is_dir():
            raise DataError(f"--results: {results} is a file, not a folder of runs")
        local = Path(args.with_runs) if args.with_runs else None
        print(make_table(results, plots=not args.no_plots, readme=Path(args.readme), local=local))

    guarded(body)


if __name__ == "__main__":
    main()
