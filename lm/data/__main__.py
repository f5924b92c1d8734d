"""``python -m lm.data [FOLDER]``: download PTB if needed and verify its MD5 sums."""

from __future__ import annotations

import logging
import sys

from lm.data.corpus import SPLITS, ensure_ptb, load_corpus, resolve_data_dir
from lm.infra.cli import guarded


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = resolve_data_dir(sys.argv[1] if len(sys.argv) > 1 else "data/ptb")

    def body() -> None:
        ensure_ptb(folder)
        corpus = load_corpus(folder)
        sizes = ", ".join(f"{s} {corpus.split(s).numel():,}" for s in SPLITS)
        print(f"PTB ok in {folder}: vocabulary {len(corpus.vocab):,}; tokens: {sizes}")

    guarded(body)


if __name__ == "__main__":
    main()
