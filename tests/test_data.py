from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from lm.data.batching import batchify, bptt_windows
from lm.data.corpora import CORPORA, CUSTOM, PTB, WIKITEXT2, corpus_layout, layout_in
from lm.data.corpus import EOS, ensure, load_corpus, tokenize
from lm.engine.runtime import load_data
from lm.infra.errors import DataError

from helpers import tiny_overrides, train_config


def test_batchify_hand_computed():
    ids = torch.arange(11)
    expected = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    assert torch.equal(batchify(ids, 3), expected)


def test_batchify_too_short_is_a_clear_error():
    with pytest.raises(DataError, match="too short for batch size 20"):
        batchify(torch.arange(30), 20)


def test_bptt_windows_hand_computed():
    data = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    windows = bptt_windows(data, 2)
    assert len(windows) == 2
    (x0, y0), (x1, y1) = windows
    assert torch.equal(x0, torch.tensor([[0, 1], [5, 6]])) and torch.equal(y0, torch.tensor([[1, 2], [6, 7]]))
    assert torch.equal(x1, torch.tensor([[2, 3], [7, 8]])) and torch.equal(y1, torch.tensor([[3, 4], [8, 9]]))


def test_bptt_last_window_is_shorter_and_every_target_counted_once():
    data = torch.arange(12).view(2, 6)
    windows = bptt_windows(data, 3)
    assert [x.size(1) for x, _ in windows] == [3, 2]
    targets = torch.cat([y for _, y in windows], dim=1)
    assert torch.equal(targets, data[:, 1:])
    assert torch.equal(torch.cat([x for x, _ in windows], dim=1), data[:, :-1])


def test_tokenize_ends_every_line_with_eos():
    assert tokenize([" a b ", "c"]) == ["a", "b", EOS, "c", EOS]


def test_vocab_from_train_only_ordered_by_frequency(tmp_path: Path):
    (tmp_path / "train.txt").write_text("b a b\nc b a\n")
    (tmp_path / "valid.txt").write_text("a b\n")
    (tmp_path / "test.txt").write_text("c\n")
    corpus = load_corpus(tmp_path)
    assert corpus.vocab.itos == ["b", EOS, "a", "c"]
    assert corpus.train.tolist() == [0, 2, 0, 1, 3, 0, 2, 1]
    assert corpus.valid.dtype == torch.int64
    assert corpus.vocab.decode(corpus.test.tolist()) == ["c", EOS]


def test_unknown_words_without_unk_are_refused(tmp_path: Path):
    (tmp_path / "train.txt").write_text("a b\n")
    (tmp_path / "valid.txt").write_text("a zebra\n")
    (tmp_path / "test.txt").write_text("a\n")
    with pytest.raises(DataError, match="valid has 1 word types not in the training vocabulary .*'zebra'"):
        load_corpus(tmp_path)


def test_unknown_words_map_to_unk_when_train_has_it(tmp_path: Path):
    (tmp_path / "train.txt").write_text("a <unk> b\n")
    (tmp_path / "valid.txt").write_text("a zebra\n")
    (tmp_path / "test.txt").write_text("b\n")
    corpus = load_corpus(tmp_path)
    assert corpus.vocab.decode(corpus.valid.tolist()) == ["a", "<unk>", EOS]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.unlink(), "is missing"),
        (lambda f: f.write_text(""), "is empty"),
        (lambda f: f.write_bytes(b"\xff\xfe bad \xff\n"), "not valid UTF-8"),
        (lambda f: f.write_text("\n\n"), "holds no words"),
    ],
    ids=["missing", "empty", "non-utf8", "blank"],
)
def test_bad_custom_files_give_clear_errors(tiny_corpus: Path, damage, message):
    damage(tiny_corpus / "valid.txt")
    with pytest.raises(DataError, match=message):
        load_corpus(tiny_corpus)


def test_env_var_overrides_configured_folder(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("LM_DATA_DIR", str(tmp_path))
    assert PTB.folder("data/ptb") == tmp_path
    assert CUSTOM.folder("my/corpus") == Path("my/corpus")  # custom corpora keep their folder
    monkeypatch.delenv("LM_DATA_DIR")
    assert PTB.folder("data/ptb") == Path("data/ptb")


# ------------------------------------------------------------- real PTB


@pytest.mark.ptb
def test_ptb_counts_and_vocabulary(ptb_dir: Path):
    corpus = load_corpus(ptb_dir)
    assert len(corpus.vocab) == 10_000
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (929_589, 73_760, 82_430)
    assert corpus.vocab.decode(corpus.vocab.encode(["the", "<unk>", EOS])) == ["the", "<unk>", EOS]


@pytest.mark.ptb
def test_download_verifies_md5(ptb_dir: Path, tmp_path: Path):
    dest = tmp_path / "ptb"
    ensure(PTB, dest, url=ptb_dir.resolve().as_uri(), download=True)  # a file:// "mirror"
    assert sorted(p.name for p in dest.iterdir()) == ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]
    # a mirror that serves a wrong file is caught, and the wrong file is reported, not used
    bad_mirror = tmp_path / "mirror"
    shutil.copytree(ptb_dir, bad_mirror)
    (bad_mirror / "ptb.valid.txt").chmod(0o644)
    with open(bad_mirror / "ptb.valid.txt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=r"ptb.valid.txt has MD5 .* expected aa0affc0.*corrupt or truncated"):
        ensure(PTB, tmp_path / "ptb2", url=bad_mirror.as_uri(), download=True)


def test_unreachable_mirror_says_what_to_do(tmp_path: Path):
    with pytest.raises(DataError, match="could not download .* offline\\? copy ptb"):
        ensure(PTB, tmp_path / "ptb", url=(tmp_path / "nowhere").as_uri(), download=True)


def test_missing_ptb_without_download(tmp_path: Path):
    with pytest.raises(DataError, match="is missing: run `make data`"):
        ensure(PTB, tmp_path, download=False)


@pytest.mark.ptb
def test_corrupt_ptb_file_is_never_used(ptb_dir: Path, tmp_path: Path):
    copy = tmp_path / "ptb"
    shutil.copytree(ptb_dir, copy)
    target = copy / "ptb.test.txt"
    target.chmod(0o644)
    target.write_text(target.read_text().replace(" the ", " a ", 1))
    with pytest.raises(DataError, match="ptb.test.txt has MD5"):
        load_corpus(copy)


# ------------------------------------------------------------- the corpus registry


def _as_wikitext2(corpus: Path, folder: Path) -> Path:
    """The tiny corpus's splits saved in WikiText-2's released layout, with its heading lines."""
    folder.mkdir()
    for split in ("train", "valid", "test"):
        text = (corpus / f"{split}.txt").read_text()
        (folder / f"wiki.{split}.tokens").write_text(f" \n = Heading = \n \n{text}")
    return folder


def test_every_corpus_names_three_distinct_files():
    for name, layout in CORPORA.items():
        assert layout.name == name and set(layout.file_names) == {"train", "valid", "test"}
        assert len(set(layout.file_names.values())) == 3
        assert set(layout.md5) <= set(layout.file_names.values())


def test_a_wikitext2_folder_is_read_in_its_layout(tiny_corpus: Path, tmp_path: Path):
    folder = _as_wikitext2(tiny_corpus, tmp_path / "wikitext-2")
    corpus = load_corpus(folder, WIKITEXT2)
    assert corpus.vocab.decode(corpus.train[:4].tolist()) == [EOS, "=", "Heading", "="]
    assert layout_in(folder) is WIKITEXT2 and load_corpus(folder).train.equal(corpus.train)  # found by its files
    plain = load_corpus(tiny_corpus, CUSTOM)
    assert corpus.train.numel() == plain.train.numel() + 6  # the heading's three lines: 3 words and 3 <eos>


def test_a_wikitext2_run_trains_from_its_preset(tiny_corpus: Path, tmp_path: Path):
    from lm.engine.training import train

    folder = _as_wikitext2(tiny_corpus, tmp_path / "wikitext-2")
    overrides = [o for o in tiny_overrides(folder, "trainer.max_steps=2") if o != "data=custom"] + ["data=wikitext2"]
    metrics = train(train_config(overrides), tmp_path / "run", overrides)
    assert metrics["config"]["data"]["name"] == "wikitext2" and metrics["steps"] == 2


def test_a_custom_folder_names_its_own_missing_files(tmp_path: Path):
    """data=custom in an empty folder asks for train.txt, not for PTB's file names."""
    with pytest.raises(DataError, match=r"nowhere/train\.txt is missing"):
        load_data(train_config(["data=custom", f"data.dir={tmp_path / 'nowhere'}"]).data)


def test_an_unknown_corpus_name_is_one_line(tmp_path: Path):
    with pytest.raises(DataError, match="data.name 'penn' is not a corpus this project knows: one of ptb, custom, wikitext2"):
        corpus_layout("penn")


# Lines the two readers could split differently: CRLF and CR endings, characters that
# str.splitlines breaks at (form feed, U+2028, U+0085) inside a line, blank lines, a tab,
# non-ASCII words, and each split ending in another way (newline, none, a blank line).
AWKWARD_SPLITS = {
    "train": " the cat sat <unk>\r\n a dog\rsaw \x0c the cat\n\n  the\u2028cat  café \u0085 dog\n the dog\tsat \n",
    "valid": " the cat sat\r\n\r\n a dog saw",
    "test": " café dog <unk>\n\n",
}


def test_without_datasets_the_corpus_reads_to_the_same_ids(monkeypatch, tmp_path: Path, caplog):
    """An offline GPU machine may lack ``datasets`` (or hold a pyarrow too old for it): the corpus is
    then read with plain Python, line for line as the text builder splits it, to the same ids."""
    import lm.data.corpus as corpus_module

    for split, text in AWKWARD_SPLITS.items():
        (tmp_path / f"{split}.txt").write_bytes(text.encode("utf-8"))
    files = {split: tmp_path / f"{split}.txt" for split in AWKWARD_SPLITS}
    with caplog.at_level("INFO", logger="lm.data.corpus"):
        with_datasets = corpus_module._read_lines(files, "digest-a")
    assert not caplog.records  # read by datasets here, not by the fallback
    assert {s: corpus_module.read_lines(p) for s, p in files.items()} == with_datasets
    assert with_datasets["valid"] == [" the cat sat", "", " a dog saw"]  # what the assertion above holds the reader to
    expected = load_corpus(tmp_path, CUSTOM)

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with caplog.at_level("INFO", logger="lm.data.corpus"):
        plain = load_corpus(tmp_path, CUSTOM)
    assert "reading the corpus with plain Python" in caplog.text
    assert plain.vocab.itos == expected.vocab.itos
    for split in AWKWARD_SPLITS:
        assert plain.split(split).equal(expected.split(split))
