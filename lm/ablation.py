"""``python -m lm.ablation runs/ablation --out results/ablation``: the dropout-placement table.

Reads one finished run per placement (the folders ``make ablation`` writes), copies
each run's ``metrics.json`` and ``train.log`` into ``--out/<placement>/``, and writes
``ablation.json``, ``README.md`` (the table, generated: never edit by hand) and
``valid_curves.png`` (validation perplexity per epoch, one line per placement).
Running it on ``results/ablation`` itself regenerates the same files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lm.infra.cli import ArgumentParser, guarded
from lm.reporting.ablation import write_ablation


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m lm.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="folder with one run folder per placement (make ablation: runs/ablation)")
    parser.add_argument("--out", default="results/ablation")
    args = parser.parse_args(argv)
    guarded(lambda: print(write_ablation(Path(args.runs), Path(args.out))))


if __name__ == "__main__":
    main(sys.argv[1:])
