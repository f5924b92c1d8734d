"""``python -m lm.figures`` (``make figures``): the dropout pictures in results/figures/.

Draws, from the real model, the masks each dropout strategy draws over time beside the hidden units
of a briefly trained small LSTM (``masks_over_time.png``), and which connections each variant masks
(``placement.png``), and writes their README; the same inputs give the same bytes. Needs PTB
(``$LM_DATA_DIR`` or data/ptb, downloaded when missing); ``--data-dir`` reads another corpus folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lm.config import compose, validate
from lm.data.corpus import load_corpus
from lm.engine.runtime import load_data
from lm.infra.cli import ArgumentParser, check_output_folder, guarded, positive_int, seed_int
from lm.reporting.figures import RECIPE, SEED, TRAIN_STEPS, make_figures


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m lm.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/figures", help="folder for the pictures and README (default: results/figures)")
    parser.add_argument(
        "--data-dir", help="a corpus folder instead of PTB (e.g. a custom one with train.txt, valid.txt, test.txt)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=TRAIN_STEPS, help=f"training windows of the model (default: {TRAIN_STEPS})"
    )
    parser.add_argument("--seed", type=seed_int, default=SEED, help=f"seeds the model and every mask (default: {SEED})")
    args = parser.parse_args(argv)

    def body() -> None:
        out = Path(args.out)
        check_output_folder(out, "--out")
        start = time.perf_counter()
        if args.data_dir:
            corpus = load_corpus(args.data_dir)
        else:
            corpus = load_data(validate(compose("train", [f"experiment={RECIPE}"])).data)
        print(make_figures(corpus, out, args.steps, args.seed))
        print(f"{time.perf_counter() - start:.0f} s")

    guarded(body)


if __name__ == "__main__":
    main(sys.argv[1:])
