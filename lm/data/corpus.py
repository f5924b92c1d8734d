"""A corpus folder read: download and verify its files (as its layout in ``lm.data.corpora`` says),
build the vocabulary, encode each split as one id tensor (``lm.data.batching`` cuts it into windows).

Data flows one way: files -> HF ``datasets`` text builder (cached) -> tokens
(``<eos>`` ends each line) -> ``Vocab`` (train only) -> 1-D int64 tensors ->
``batchify`` -> ``bptt_windows``. Where ``datasets`` cannot be imported or used (an offline
GPU machine without it, or with a pyarrow too old for it), the same lines are read with
plain Python: the same ids either way (tests/test_data.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.data.corpora import DATA_DIR_ENV, SPLITS, CorpusLayout, layout_in
from lm.infra.errors import DataError
from lm.infra.outputs import atomic_write, file_digest, os_error_in

log = logging.getLogger(__name__)

EOS = "<eos>"
UNK = "<unk>"


# ---------------------------------------------------------------- files


def _download(url: str, dest: Path) -> None:
    """``url`` into ``dest`` through a temporary file of its own (a file of the user's is never replaced
    or removed: only missing files are downloaded)."""

    def copy(out) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            while block := response.read(1 << 20):
                out.write(block)

    atomic_write(dest, copy)


def verify(layout: CorpusLayout, folder: Path) -> None:
    """Check the MD5 of every file the layout has a sum for; a wrong file is never used silently."""
    for name, expected in layout.md5.items():
        path = folder / name
        if not path.exists():
            raise DataError(
                f"{path} is missing: run `make data`, or point data.dir / ${DATA_DIR_ENV} "
                f"at a folder with the {layout.label} files"
            )
        actual = file_digest(path, "md5")
        if actual != expected:
            raise DataError(
                f"{path} has MD5 {actual}, expected {expected} (corrupt or truncated): delete it and run `make data` again"
            )


def ensure(layout: CorpusLayout, folder: Path, url: str | None = None, download: bool = True) -> Path:
    """Make sure the corpus's files are in ``folder``, with the right MD5 sums where it has them.

    Missing files are downloaded from ``url`` (default: the layout's) when ``download`` is true and
    the corpus has a source; files that are present but wrong are reported, not replaced.
    """
    folder = Path(folder)
    url = url or layout.url
    missing = [name for name in layout.file_names.values() if not (folder / name).exists()]
    if missing and download and url:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create data folder {folder} ({err.strerror}): set data.dir to a writable folder") from None
        for name in missing:
            source = url.rstrip("/") + "/" + name
            log.info("downloading %s", source)
            try:
                _download(source, folder / name)
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", None) or err
                raise DataError(
                    f"could not download {source} ({reason}): offline? copy {', '.join(layout.file_names.values())} "
                    f"into {folder} or set ${DATA_DIR_ENV} to a folder that has them"
                ) from None
    verify(layout, folder)
    return folder


# ---------------------------------------------------------------- vocabulary and encoding


class Vocab:
    """Word <-> id. Ids are ordered by training frequency (ties alphabetically)."""

    def __init__(self, words: Sequence[str]):
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    @classmethod
    def from_counts(cls, counts: Counter) -> Vocab:
        return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __getitem__(self, word: str) -> int:
        return self.stoi[word]

    def encode(self, words: Iterable[str]) -> list[int]:
        return [self.stoi[w] for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]


@dataclass
class Corpus:
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        return getattr(self, name)


def content_digest(blobs: Iterable[bytes]) -> str:
    """A short hash of the files' bytes (BLAKE2b, about 1 GB/s): what the ``datasets`` cache is keyed on."""
    digest = hashlib.blake2b(digest_size=16)
    for blob in blobs:
        digest.update(len(blob).to_bytes(8, "little"))
        digest.update(blob)
    return digest.hexdigest()


def _read_lines(files: dict[str, Path], digest: str) -> dict[str, list[str]]:
    """Read each split's lines through the HF ``datasets`` text builder, cached by content.

    ``datasets`` keys its cache on the files' paths and modification times, so a file changed
    with its mtime kept (``cp -p``, ``tar``, ``rsync -t``) would be read from the old cache. The
    digest of the bytes goes into the builder config (its ``description``), which is part of the
    cache key: other bytes, another cache entry. Without a usable ``datasets``, ``read_lines``.
    """
    try:
        import datasets  # heavy (pyarrow, pandas): loaded only when a corpus is read, not by batchify's users

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset("text", data_files={s: str(p) for s, p in files.items()}, description=f"content-{digest}")
        return {s: ds[s]["text"] for s in files}
    except Exception as err:  # not installed, or unusable here (datasets 5 needs pyarrow >= 24): the files are checked already
        if os_error_in(err) is not None:  # a full disk or a read-only cache is the machine's, not datasets': say so
            raise
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        log.info("HF datasets unavailable (%s): reading the corpus with plain Python, the same lines", reason)
        return {s: read_lines(p) for s, p in files.items()}


def read_lines(path: Path) -> list[str]:
    """A text file's lines as the ``datasets`` text builder returns them: universal newlines
    (``\\r\\n`` and ``\\r`` read as ``\\n``), split on ``\\n`` only (not on the other characters
    ``str.splitlines`` breaks at), line breaks removed, no empty last line after a final newline."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def tokenize(lines: Iterable[str]) -> list[str]:
    """Whitespace tokens, with ``<eos>`` closing every line (blank lines too)."""
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def _encode_split(name: str, tokens: list[str], vocab: Vocab) -> torch.Tensor:
    unknown = [w for w in set(tokens) if w not in vocab]
    if unknown:
        if UNK not in vocab:
            raise DataError(
                f"{name} has {len(unknown)} word types not in the training vocabulary (e.g. {sorted(unknown)[0]!r}) "
                f"and the vocabulary has no {UNK}: add {UNK} to train or remove those words"
            )
        unk = vocab[UNK]
        return torch.tensor([vocab.stoi.get(w, unk) for w in tokens], dtype=torch.int64)
    return torch.tensor(vocab.encode(tokens), dtype=torch.int64)


def load_corpus(path: str | os.PathLike, layout: CorpusLayout | None = None, check_md5: bool = True) -> Corpus:
    """Load a corpus folder in ``layout`` (default: the one whose files the folder holds, lm.data.corpora);
    files with a known MD5 sum are checked first. The vocabulary is built from train only; each split
    is one int64 tensor.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not a corpus folder: point data.dir / ${DATA_DIR_ENV} at the folder")
    layout = layout or layout_in(folder)
    files = layout.files(folder)
    blobs = []
    for split, file in files.items():
        if not file.is_file():
            raise DataError(f"{file} is missing: run `make data`, or point data.dir / ${DATA_DIR_ENV} at the corpus folder")
        try:
            blob = file.read_bytes()
        except OSError as err:
            raise DataError(f"{file} cannot be read ({err.strerror}): check its permissions") from None
        if not blob:
            raise DataError(f"{file} is empty: replace it with the real {split} file")
        try:
            blob.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{file} is not valid UTF-8 ({err.reason} at byte {err.start}): fix or replace the file") from None
        blobs.append(blob)
    if check_md5:
        verify(layout, folder)
    lines = _read_lines(files, content_digest(blobs))
    tokens = {s: tokenize(lines[s]) for s in SPLITS}
    for split in SPLITS:
        if len(tokens[split]) == len(lines[split]):
            raise DataError(f"{files[split]} holds no words: replace it with the real {split} file")
    vocab = Vocab.from_counts(Counter(tokens["train"]))
    encoded = {s: _encode_split(s, tokens[s], vocab) for s in SPLITS}
    return Corpus(vocab=vocab, **encoded)
