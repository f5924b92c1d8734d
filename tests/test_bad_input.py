"""Every bad input ends the command with one clear line on stderr, exit code 2, no
traceback, and nothing already written touched. Table-driven, run in-process."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from lm import evaluate as evaluate_module
from lm import train as train_module

from helpers import tiny_overrides, write_corpus


def run_cli(entry, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        with pytest.raises(SystemExit) as info:
            entry()
    finally:
        GlobalHydra.instance().clear()
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory, ptb_dir_optional):
    """Corpora, a finished run and checkpoints that the bad commands point at."""
    from lm.train import train
    from helpers import train_config

    root = tmp_path_factory.mktemp("world")
    good = write_corpus(root / "good")
    run = root / "finished"
    train(train_config(tiny_overrides(good, "trainer.max_steps=2")), run)
    other_model = root / "other-model"
    train(train_config(tiny_overrides(good, "trainer.max_steps=1", "model.hidden_size=8")), other_model)
    bad = {}
    for name, damage in {
        "empty": lambda d: (d / "valid.txt").write_text(""),
        "non-utf8": lambda d: (d / "test.txt").write_bytes(b"caf\xe9 au lait\n"),
        "no-words": lambda d: (d / "valid.txt").write_text("\n\n\n"),
        "unknown-words": lambda d: (d / "test.txt").write_text("zebra quagga\n"),
        "missing-file": lambda d: (d / "train.txt").unlink(),
    }.items():
        folder = write_corpus(root / name)
        if name == "unknown-words":  # a corpus whose vocabulary has no <unk>
            for split in ("train", "valid"):
                path = folder / f"{split}.txt"
                path.write_text(path.read_text().replace("<unk>", "cat"))
        damage(folder)
        bad[name] = folder
    other_vocab = write_corpus(root / "other-vocab", seed=3)
    (other_vocab / "train.txt").write_text((other_vocab / "train.txt").read_text() + " brand new words\n")
    (root / "a-file").write_text("not a folder")
    corrupt = root / "corrupt.pt"
    corrupt.write_bytes((run / "checkpoint.pt").read_bytes()[:500])
    ptb = {}
    if ptb_dir_optional is not None:
        for name in ("truncated", "md5"):
            folder = root / f"ptb-{name}"
            shutil.copytree(ptb_dir_optional, folder)
            target = folder / "ptb.valid.txt"
            target.chmod(0o644)
            text = target.read_bytes()
            target.write_bytes(text[: len(text) // 2] if name == "truncated" else text.replace(b" the ", b" ehT ", 1))
            ptb[name] = folder
    return {"root": root, "good": good, "other-vocab": other_vocab, "run": run, "other": other_model, "bad": bad, "corrupt": corrupt, "ptb": ptb}


@pytest.fixture(scope="module")
def ptb_dir_optional():
    import os

    folder = os.environ.get("LM_DATA_DIR")
    return Path(folder) if folder and (Path(folder) / "ptb.train.txt").exists() else None


CONFIG_CASES = [
    (["model.foo=1"], "Key 'foo' is not in struct"),
    (["foo=1"], "Key 'foo' is not in struct"),
    (["model=huge"], "Could not find 'model/huge'"),
    (["experiment=nope"], "Could not find 'experiment/nope'"),
    (["model.dropout=["], "model.dropout=["),
    (["model.hidden_size=abc"], "model.hidden_size"),
    (["trainer.epochs=1.5"], "trainer.epochs"),
    (["trainer.progress=maybe"], "trainer.progress"),
    (["model.hidden_size=0"], "model.hidden_size must be a positive integer, got 0"),
    (["model.hidden_size=-5"], "model.hidden_size must be a positive integer, got -5"),
    (["model.num_layers=0"], "model.num_layers must be a positive integer"),
    (["model.dropout=1.5"], "model.dropout must be in [0, 1), got 1.5"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1), got 1.0"),
    (["model.dropout=-0.1"], "model.dropout must be in [0, 1), got -0.1"),
    (["model.init_scale=0"], "model.init_scale must be in (0, 1]"),
    (["data.batch_size=0"], "data.batch_size must be a positive integer"),
    (["data.bptt=0"], "data.bptt must be a positive integer"),
    (["optim.lr=0"], "optim.lr must be a positive number"),
    (["optim.lr_decay=0"], "optim.lr_decay must be in (0, 1]"),
    (["optim.lr_decay=1.5"], "optim.lr_decay must be in (0, 1]"),
    (["optim.decay_start_epoch=-1"], "optim.decay_start_epoch must be a non-negative integer"),
    (["optim.decay_convention=torch"], "optim.decay_convention must be one of"),
    (["optim.max_grad_norm=-1"], "optim.max_grad_norm must be a positive number"),
    (["trainer.epochs=0"], "trainer.epochs must be a positive integer"),
    (["trainer.max_steps=0"], "trainer.max_steps must be null or a positive integer"),
    (["trainer.seed=-1"], "trainer.seed must be a non-negative integer"),
    (["trainer.device=tpu"], "trainer.device must be cpu, cuda or auto"),
    (["trainer.threads=-1"], "trainer.threads must be 0 (all cores) or a positive integer"),
    (["trainer.nonfinite=ignore"], "trainer.nonfinite must be stop or skip"),
    (["trainer.precision=fp16"], "trainer.precision must be one of"),
    (["optim.weight_decay=1.5"], "optim.weight_decay must be in [0, 1)"),
    (["trainer.log_every=0"], "trainer.log_every must be a positive integer"),
    (["trainer.eval_window=0"], "trainer.eval_window must be a positive integer"),
    (["experiment=zaremba_medium", "model.dropout_variant=variational"], "model.dropout=0.5 has no effect with model.dropout_variant=variational"),
]


@pytest.mark.parametrize("args, message", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
def test_bad_config_values(args, message, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code, err = run_cli(train_module._hydra_entry, [*args, f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert not run_dir.exists()


def _assert_one_line(code: int, err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert "Traceback" not in err


# (case id, argv builder, expected message); argv builders get the world dict.
RUN_CASES = [
    ("missing-data-folder", lambda w: ["data=custom", f"data.dir={w['root'] / 'nowhere'}"], "is missing"),
    ("missing-file", lambda w: ["data=custom", f"data.dir={w['bad']['missing-file']}"], "train.txt is missing"),
    ("empty-file", lambda w: ["data=custom", f"data.dir={w['bad']['empty']}"], "valid.txt is empty"),
    ("non-utf8-file", lambda w: ["data=custom", f"data.dir={w['bad']['non-utf8']}"], "test.txt is not valid UTF-8"),
    ("no-words", lambda w: ["data=custom", f"data.dir={w['bad']['no-words']}"], "valid.txt holds no words"),
    ("unknown-words-no-unk", lambda w: ["data=custom", f"data.dir={w['bad']['unknown-words']}"],
     "test has 2 word types not in the training vocabulary"),
    ("batch-larger-than-data", lambda w: [*tiny_overrides(w["good"]), "data.batch_size=100000"], "lower data.batch_size"),
    ("bptt-larger-than-data", lambda w: [*tiny_overrides(w["good"]), "data.bptt=5000"], "data.bptt 5000 is not shorter"),
    ("output-under-a-file", lambda w: [*tiny_overrides(w["good"]), f"hydra.run.dir={w['root'] / 'a-file' / 'run'}"],
     "is not a folder"),
    ("finished-run", lambda w: [*tiny_overrides(w["good"]), f"hydra.run.dir={w['run']}"], "already holds a finished run"),
    ("resume-missing", lambda w: [*tiny_overrides(w["good"]), f"trainer.resume={w['root'] / 'none.pt'}"], "does not exist"),
    ("resume-corrupt", lambda w: [*tiny_overrides(w["good"]), f"trainer.resume={w['corrupt']}"], "corrupt or not a checkpoint"),
    ("resume-other-model", lambda w: [*tiny_overrides(w["good"]), f"trainer.resume={w['other'] / 'checkpoint.pt'}"],
     "checkpoint is from another model (model.hidden_size 8, this run 16)"),
]


@pytest.mark.parametrize("case, build, message", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_data_runs_and_checkpoints(case, build, message, world, tmp_path, monkeypatch, capsys):
    argv = build(world)
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={tmp_path / 'run'}")
    before = (world["run"] / "metrics.json").read_bytes()
    code, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert (world["run"] / "metrics.json").read_bytes() == before
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("name, message", [("truncated", "ptb.valid.txt has MD5"), ("md5", "ptb.valid.txt has MD5")])
def test_corrupt_ptb_files(name, message, world, tmp_path, monkeypatch, capsys):
    if name not in world["ptb"]:
        pytest.skip("needs the real PTB (LM_DATA_DIR)")
    monkeypatch.delenv("LM_DATA_DIR", raising=False)
    argv = [f"data.dir={world['ptb'][name]}", "data.download=false", f"hydra.run.dir={tmp_path / 'run'}"]
    code, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, message)


EVAL_CASES = [
    ("missing", lambda w: [f"checkpoint={w['root'] / 'none.pt'}"], "does not exist"),
    ("corrupt", lambda w: [f"checkpoint={w['corrupt']}"], "corrupt or not a checkpoint"),
    ("not-a-checkpoint", lambda w: [f"checkpoint={w['good'] / 'train.txt'}"], "corrupt or not a checkpoint"),
    ("other-vocabulary", lambda w: [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"data_dir={w['other-vocab']}"],
     "checkpoint has a vocabulary of 25 words, the corpus 28"),
    ("no-checkpoint", lambda w: [], "checkpoint"),
    ("bad-threads", lambda w: [f"checkpoint={w['run'] / 'checkpoint.pt'}", "threads=-2"], "threads must be"),
]


@pytest.mark.parametrize("case, build, message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_evaluate_commands(case, build, message, world, monkeypatch, capsys):
    code, err = run_cli(evaluate_module._hydra_entry, build(world), monkeypatch, capsys)
    _assert_one_line(code, err, message)
