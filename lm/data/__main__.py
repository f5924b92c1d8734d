"""``python -m lm.data [FOLDER]``: download PTB if needed and verify its MD5 sums."""

from __future__ import annotations

import logging
import sys

from lm.data.corpora import PTB, SPLITS
from lm.data.corpus import ensure, load_corpus
from lm.infra.cli import guarded


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = PTB.folder(sys.argv[1] if len(sys.argv) > 1 else PTB.default_dir)

    def body() -> None:
        ensure(PTB, folder)
        corpus = load_corpus(folder, PTB, check_md5=False)
        sizes = ", ".join(f"{s} {corpus.split(s).numel():,}" for s in SPLITS)
        print(f"PTB ok in {folder}: vocabulary {len(corpus.vocab):,}; tokens: {sizes}")

    guarded(body)


if __name__ == "__main__":
    main()
