"""Every bad input ends the command with one clear line on stderr, the right exit code, no
traceback, and nothing already written touched. Table-driven, run in-process: each entry point's
main function with an argv, stderr captured; a snapshot of every file the cases could touch
(bytes and modification times) is compared after each case."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from lm import ablation as ablation_module
from lm import ensemble as ensemble_module
from lm import evaluate as evaluate_module
from lm import generate as generate_module
from lm import report as report_module
from lm import train as train_module
from lm.engine import evaluation as evaluation_module
from lm.infra.checkpoint import RunFolderLock, save_checkpoint, vocab_digest

from helpers import tiny_overrides, write_corpus


def run_cli(entry, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """A Hydra entry point (``_hydra_entry``) with ``argv``: (exit code, stderr)."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        with pytest.raises(SystemExit) as info:
            entry()
    finally:
        GlobalHydra.instance().clear()
    return info.value.code, capsys.readouterr().err


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """An argparse entry point (``main(argv)``): (exit code, stderr); 0 when it returns."""
    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """{file: (mtime_ns, sha1)} of every file under ``root`` but lock files (a lock attempt may
    write its pid) and empty ``train.log`` files (Hydra opens its log before the run's own checks;
    README, Reliability)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock" and not (p.name == "train.log" and p.stat().st_size == 0)
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, ptb_dir_optional):
    """Corpora, a finished run and checkpoints that the bad commands point at."""
    from lm.engine.training import train

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
    extra = _more_world(root, good, run)
    return {
        "root": root,
        "good": good,
        "other-vocab": other_vocab,
        "run": run,
        "other": other_model,
        "bad": bad,
        "corrupt": corrupt,
        "ptb": ptb,
        **extra,
    }


def _more_world(root: Path, good: Path, run: Path) -> dict:
    """Folders and checkpoints of the reliability issue's examples."""
    from lm.engine.training import train
    from lm.infra.faults import TrainingInterrupted

    from helpers import train_config

    unfinished = root / "unfinished"  # stopped by SIGTERM mid-epoch: checkpoint.pt, no metrics.json
    os.environ["LM_FAULT"] = "step:3:TERM"
    try:
        with pytest.raises(TrainingInterrupted):
            train(train_config(tiny_overrides(good, "trainer.epochs=2")), unfinished)
    finally:
        del os.environ["LM_FAULT"]
    metrics_only = root / "metrics-only"  # a committed results/ run: metrics.json, no checkpoint
    metrics_only.mkdir()
    shutil.copy2(run / "metrics.json", metrics_only / "metrics.json")
    same_size = root / "same-size-vocab"  # as many words as `good`, but other ones
    same_size.mkdir()
    for split in ("train", "valid", "test"):
        (same_size / f"{split}.txt").write_text((good / f"{split}.txt").read_text().replace("cat", "cow"))
    short_test = write_corpus(root / "short-test")
    (short_test / "test.txt").write_text("the cat\n")  # 3 tokens: too short for 4 streams
    sweep_job = root / "sweep-1" / "trainer.seed=1,model.dropout=0.3"  # a job folder of an older sweep
    shutil.copytree(run, sweep_job)
    other_weights = torch.load(sweep_job / "checkpoint.pt", weights_only=True)  # another model: an ensemble refuses a copy
    other_weights.pop("format_version")
    next(iter(other_weights["model"].values())).add_(0.01)
    save_checkpoint(sweep_job / "checkpoint.pt", other_weights)
    spaced = root / "my runs" / "run 1"
    shutil.copytree(run, spaced)

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    damaged = root / "damaged"
    damaged.mkdir()

    def variant(name: str, change) -> Path:
        payload = {k: v for k, v in ckpt.items() if k != "format_version"}
        payload["model"] = dict(payload["model"])
        payload["config"] = json.loads(json.dumps(payload["config"]))
        change(payload)
        save_checkpoint(damaged / f"{name}.pt", payload)
        return damaged / f"{name}.pt"

    def wrong_shape(p):
        key = next(k for k in p["model"] if "weight_hh" in k)
        p["model"][key] = p["model"][key][:-1]

    def duplicate_words(p):
        p["vocab"] = [p["vocab"][0]] * len(p["vocab"])
        p["vocab_sha256"] = vocab_digest(p["vocab"])

    def evil_data(p):  # a checkpoint that names a data folder and URL of its choosing, and no vocabulary
        p["config"]["data"].update(name="ptb", dir=str(root / "evil"), download=True, url="http://127.0.0.1:9/")
        p.pop("vocab")
        p.pop("vocab_sha256", None)

    checkpoints = {
        "no-optimizer": variant("no-optimizer", lambda p: p.pop("optimizer")),
        "no-config": variant("no-config", lambda p: p.pop("config")),
        "epoch-text": variant("epoch-text", lambda p: p.update(epoch="one")),
        "wrong-shape": variant("wrong-shape", wrong_shape),
        "missing-weight": variant("missing-weight", lambda p: p["model"].pop(next(iter(p["model"])))),
        "duplicate-words": variant("duplicate-words", duplicate_words),
        "vocab-digest": variant("vocab-digest", lambda p: p.update(vocab_sha256="0" * 64)),
        "evil-data": variant("evil-data", evil_data),
    }
    foreign = root / "foreign-runs" / "someone"
    foreign.mkdir(parents=True)
    (foreign / "metrics.json").write_text(json.dumps({"loss": 1.0}))
    broken_json = root / "broken-json" / "x"
    broken_json.mkdir(parents=True)
    (broken_json / "metrics.json").write_text("{not json")
    (root / "empty-folder").mkdir()
    return {
        "unfinished": unfinished,
        "metrics-only": metrics_only,
        "same-size": same_size,
        "short-test": short_test,
        "sweep-job": sweep_job,
        "spaced": spaced,
        "damaged": checkpoints,
        "foreign": foreign.parent,
        "broken-json": broken_json.parent,
        "empty": root / "empty-folder",
    }


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
    (
        ["experiment=zaremba_medium", "model.dropout_variant=variational"],
        "model.dropout=0.5 has no effect with model.dropout_variant=variational",
    ),
]


@pytest.mark.parametrize("args, message", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
@pytest.mark.full
def test_bad_config_values(args, message, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code, err = run_cli(train_module._hydra_entry, [*args, f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert not run_dir.exists()


def _assert_one_line(code: int, err: str, message: str, expected_code: int = 2, prefix: str = "error: ") -> None:
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert message in lines[0], err
    assert "Traceback" not in err


# (case id, argv builder, expected message); argv builders get the world dict.
RUN_CASES = [
    ("missing-data-folder", lambda w: ["data=custom", f"data.dir={w['root'] / 'nowhere'}"], "is missing"),
    ("missing-file", lambda w: ["data=custom", f"data.dir={w['bad']['missing-file']}"], "train.txt is missing"),
    ("empty-file", lambda w: ["data=custom", f"data.dir={w['bad']['empty']}"], "valid.txt is empty"),
    ("non-utf8-file", lambda w: ["data=custom", f"data.dir={w['bad']['non-utf8']}"], "test.txt is not valid UTF-8"),
    ("no-words", lambda w: ["data=custom", f"data.dir={w['bad']['no-words']}"], "valid.txt holds no words"),
    (
        "unknown-words-no-unk",
        lambda w: ["data=custom", f"data.dir={w['bad']['unknown-words']}"],
        "test has 2 word types not in the training vocabulary",
    ),
    ("batch-larger-than-data", lambda w: [*tiny_overrides(w["good"]), "data.batch_size=100000"], "lower data.batch_size"),
    ("bptt-larger-than-data", lambda w: [*tiny_overrides(w["good"]), "data.bptt=5000"], "data.bptt 5000 is not shorter"),
    (
        "output-under-a-file",
        lambda w: [*tiny_overrides(w["good"]), f"hydra.run.dir={w['root'] / 'a-file' / 'run'}"],
        "is not a folder",
    ),
    ("finished-run", lambda w: [*tiny_overrides(w["good"]), f"hydra.run.dir={w['run']}"], "already holds a finished run"),
    ("resume-missing", lambda w: [*tiny_overrides(w["good"]), f"trainer.resume={w['root'] / 'none.pt'}"], "does not exist"),
    ("resume-corrupt", lambda w: [*tiny_overrides(w["good"]), f"trainer.resume={w['corrupt']}"], "corrupt or not a checkpoint"),
    (
        "resume-other-model",
        lambda w: [*tiny_overrides(w["good"]), f"trainer.resume={w['other'] / 'checkpoint.pt'}"],
        "checkpoint is from another model (model.hidden_size 8, this run 16)",
    ),
]


@pytest.mark.parametrize("case, build, message", RUN_CASES, ids=[c[0] for c in RUN_CASES])
@pytest.mark.full
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
@pytest.mark.full
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
    (
        "other-vocabulary",
        lambda w: [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"data_dir={w['other-vocab']}"],
        "checkpoint has a vocabulary of 25 words, the corpus 28",
    ),
    ("no-checkpoint", lambda w: [], "checkpoint"),
    ("bad-threads", lambda w: [f"checkpoint={w['run'] / 'checkpoint.pt'}", "threads=-2"], "threads must be"),
]


@pytest.mark.parametrize("case, build, message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_evaluate_commands(case, build, message, world, monkeypatch, capsys):
    code, err = run_cli(evaluate_module._hydra_entry, build(world), monkeypatch, capsys)
    _assert_one_line(code, err, message)


# ------------------------------------------------------------- lm.train: run folders, resume, paths


def _ckpt(w, name: str) -> str:
    return str(w["damaged"][name])


# (case id, argv builder, expected message, exit code); a builder gets the world and a fresh folder.
TRAIN_CASES = [
    # cause 1: a folder that holds a run is never replaced by accident
    (
        "unfinished-run-without-resume",
        lambda w, t: [*tiny_overrides(w["good"], "trainer.epochs=2"), f"hydra.run.dir={w['unfinished']}"],
        "already holds an unfinished run (checkpoint.pt, no metrics.json): pass trainer.resume=auto",
        2,
    ),
    (
        "resume-auto-over-metrics-only",
        lambda w, t: [*tiny_overrides(w["good"]), "trainer.resume=auto", f"hydra.run.dir={w['metrics-only']}"],
        "holds a finished run's metrics.json but no checkpoint.pt",
        2,
    ),
    (
        "resume-path-into-finished-run",
        lambda w, t: [*tiny_overrides(w["good"]), f"trainer.resume={w['other'] / 'checkpoint.pt'}", f"hydra.run.dir={w['run']}"],
        "would replace: resume into a new folder",
        2,
    ),
    (
        "resume-path-into-unfinished-run",
        lambda w, t: [
            *tiny_overrides(w["good"]),
            f"trainer.resume={w['run'] / 'checkpoint.pt'}",
            f"hydra.run.dir={w['unfinished']}",
        ],
        "already holds an unfinished run",
        2,
    ),
    (
        "overwrite-and-resume",
        lambda w, t: [*tiny_overrides(w["good"]), "trainer.overwrite=true", "trainer.resume=auto", f"hydra.run.dir={w['run']}"],
        "give one of them",
        2,
    ),
    (
        "overwrite-with-bad-data",
        lambda w, t: [*tiny_overrides(w["bad"]["empty"]), "trainer.overwrite=true", f"hydra.run.dir={w['run']}"],
        "valid.txt is empty",
        2,
    ),
    (
        "overwrite-with-too-long-bptt",
        lambda w, t: [*tiny_overrides(w["good"]), "data.bptt=5000", "trainer.overwrite=true", f"hydra.run.dir={w['unfinished']}"],
        "data.bptt 5000 is not shorter",
        2,
    ),
    (
        "finished-sweep-job-rerun",
        lambda w, t: [*tiny_overrides(w["good"]), f"hydra.run.dir={w['sweep-job']}"],
        "already holds a finished run",
        2,
    ),
    # cause 2: resume refuses a changed hyperparameter, naming the key and both values
    *[
        (
            f"resume-changed-{key}",
            lambda w, t, key=key, value=value: [
                *tiny_overrides(w["good"], "trainer.epochs=2"),
                "trainer.resume=auto",
                f"{key}={value}",
                f"hydra.run.dir={w['unfinished']}",
            ],
            f"{key} is {shown} here but",
            2,
        )
        for key, value, shown in [
            ("optim.lr", "2.0", "2.0"),
            ("model.dropout", "0.3", "0.3"),
            ("model.init_scale", "0.05", "0.05"),
            ("data.batch_size", "2", "2"),
            ("data.bptt", "7", "7"),
            ("trainer.seed", "5", "5"),
            ("optim.max_grad_norm", "1.0", "1.0"),
            ("optim.lr_decay", "0.9", "0.9"),
            ("trainer.precision", "bf16", "'bf16'"),
        ]
    ],
    (
        "resume-other-words-same-size",
        lambda w, t: [*tiny_overrides(w["same-size"]), f"trainer.resume={w['run'] / 'checkpoint.pt'}"],
        "checkpoint's vocabulary differs from this run's corpus's (same",
        2,
    ),
    (
        "resume-bad-allow-changes",
        lambda w, t: [*tiny_overrides(w["good"]), "trainer.allow_changes=[model.foo]"],
        "trainer.allow_changes must be a list of keys among",
        2,
    ),
    # cause 3: a damaged checkpoint is one line
    (
        "resume-no-optimizer",
        lambda w, t: [*tiny_overrides(w["good"]), f"trainer.resume={_ckpt(w, 'no-optimizer')}"],
        "is damaged ('optimizer' is missing, expected a dict)",
        2,
    ),
    (
        "resume-no-config",
        lambda w, t: [*tiny_overrides(w["good"]), f"trainer.resume={_ckpt(w, 'no-config')}"],
        "'config' is missing",
        2,
    ),
    (
        "resume-epoch-text",
        lambda w, t: [*tiny_overrides(w["good"]), f"trainer.resume={_ckpt(w, 'epoch-text')}"],
        "'epoch' is a str",
        2,
    ),
    (
        "resume-wrong-shape",
        lambda w, t: [*tiny_overrides(w["good"]), f"trainer.resume={_ckpt(w, 'wrong-shape')}"],
        "cannot be resumed",
        2,
    ),
    (
        "resume-vocab-digest",
        lambda w, t: [*tiny_overrides(w["good"]), f"trainer.resume={_ckpt(w, 'vocab-digest')}"],
        "does not match its digest",
        2,
    ),
    (
        "resume-folder-without-checkpoint",
        lambda w, t: [*tiny_overrides(w["good"]), f"trainer.resume={w['empty']}"],
        "does not exist",
        2,
    ),
    # cause 4: checked before the work
    ("test-split-too-short", lambda w, t: [*tiny_overrides(w["short-test"])], "too short for batch size 4", 2),
    ("data-dir-is-a-file", lambda w, t: ["data=custom", f"data.dir={w['root'] / 'a-file'}"], "is a file, not a corpus folder", 2),
]


@pytest.mark.parametrize("case, build, message, code", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
@pytest.mark.full
def test_train_refuses_and_touches_nothing(case, build, message, code, world, tmp_path, monkeypatch, capsys):
    argv = build(world, tmp_path)
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={tmp_path / 'run'}")
    before = snapshot(world["root"])
    got, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(got, err, message, code)
    assert snapshot(world["root"]) == before
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("holds", ["nothing", "unfinished", "unfinished-resume-auto"])
def test_a_locked_run_folder_is_refused(holds, world, tmp_path, monkeypatch, capsys):
    """Two trainings into one folder: the second stops at once with one line, whatever the
    first has written there yet."""
    folder = tmp_path / "busy"
    if holds != "nothing":
        shutil.copytree(world["unfinished"], folder)
    extra = ["trainer.resume=auto", "trainer.epochs=2"] if holds.endswith("auto") else []
    with RunFolderLock(folder):  # stands in for a training running there
        before = snapshot(folder)
        code, err = run_cli(
            train_module._hydra_entry, [*tiny_overrides(world["good"]), *extra, f"hydra.run.dir={folder}"], monkeypatch, capsys
        )
        _assert_one_line(code, err, f"{folder} is in use by another run (process {os.getpid()})")
        assert snapshot(folder) == before and (not (folder / "train.log").exists() or holds != "nothing")


def _fail_on(monkeypatch, target, attr: str, err: OSError) -> None:
    def fail(*args, **kwargs):
        raise err

    monkeypatch.setattr(target, attr, fail)


@pytest.mark.parametrize(
    "case, error, message",
    [
        (
            "disk-full",
            OSError(errno.ENOSPC, "No space left on device", "checkpoint.pt"),
            "checkpoint.pt: No space left on device",
        ),
        ("read-only", OSError(errno.EROFS, "Read-only file system", "checkpoint.pt"), "checkpoint.pt: Read-only file system"),
    ],
)
def test_os_errors_while_writing_are_one_line(case, error, message, world, tmp_path, monkeypatch, capsys):
    import lm.infra.outputs

    _fail_on(monkeypatch, lm.infra.outputs.tempfile, "mkstemp", error)
    code, err = run_cli(
        train_module._hydra_entry,
        [*tiny_overrides(world["good"], "trainer.max_steps=1"), f"hydra.run.dir={tmp_path / 'run'}"],
        monkeypatch,
        capsys,
    )
    _assert_one_line(code, err, message)


def test_unreadable_data_file_is_one_line(world, tmp_path, monkeypatch, capsys):
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "valid.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    code, err = run_cli(
        train_module._hydra_entry, [*tiny_overrides(world["good"]), f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys
    )
    _assert_one_line(code, err, "valid.txt cannot be read (Permission denied)")


# ------------------------------------------------------------- lm.evaluate

EVAL_MORE_CASES = [
    (
        "output-is-a-folder",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"data_dir={w['good']}", f"output={w['empty']}"],
        "output: ",
    ),
    (
        "output-under-a-file",
        lambda w, t: [
            f"checkpoint={w['run'] / 'checkpoint.pt'}",
            f"data_dir={w['good']}",
            f"output={w['root'] / 'a-file' / 'e.json'}",
        ],
        "is not a folder",
    ),
    (
        "same-size-other-words",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"data_dir={w['same-size']}", f"output={t / 'e.json'}"],
        "checkpoint's vocabulary differs from the corpus's (same 25 words in size, but id",
    ),
    (
        "custom-corpus-needs-data-dir",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"output={t / 'e.json'}"],
        "trained on the 'custom' corpus: give its folder with data_dir=PATH",
    ),
    (
        "data-dir-missing",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"data_dir={w['root'] / 'nowhere'}", f"output={t / 'e.json'}"],
        "is missing",
    ),
    (
        "data-dir-is-a-file",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"data_dir={w['root'] / 'a-file'}", f"output={t / 'e.json'}"],
        "is a file",
    ),
    (
        "batch-too-large-for-test",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"data_dir={w['short-test']}", f"output={t / 'e.json'}"],
        "too short for batch size",
    ),
    ("no-config", lambda w, t: [f"checkpoint={_ckpt(w, 'no-config')}", f"output={t / 'e.json'}"], "'config' is missing"),
    (
        "wrong-shape",
        lambda w, t: [f"checkpoint={_ckpt(w, 'wrong-shape')}", f"data_dir={w['good']}", f"output={t / 'e.json'}"],
        "checkpoint's weights do not fit its model",
    ),
    (
        "missing-weight",
        lambda w, t: [f"checkpoint={_ckpt(w, 'missing-weight')}", f"data_dir={w['good']}", f"output={t / 'e.json'}"],
        "checkpoint's weights do not fit its model",
    ),
    ("folder-without-checkpoint", lambda w, t: [f"checkpoint={w['empty']}"], "does not exist"),
    (
        "eval-window-zero",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", "eval_window=0"],
        "eval_window must be null or a positive",
    ),
    (
        "batch-size-zero",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", "batch_size=0"],
        "batch_size must be null or a positive",
    ),
    ("bptt-text", lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", "bptt=abc"], "bptt"),
    (
        "mc-samples-zero",
        lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", "eval.mc_samples=0"],
        "eval.mc_samples must be",
    ),
    ("device-tpu", lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", "device=tpu"], "device must be cpu, cuda or auto"),
    ("unknown-key", lambda w, t: [f"checkpoint={w['run'] / 'checkpoint.pt'}", "foo=1"], "foo"),
]


@pytest.mark.parametrize("case, build, message", EVAL_MORE_CASES, ids=[c[0] for c in EVAL_MORE_CASES])
@pytest.mark.full
def test_evaluate_refuses_before_work_and_touches_nothing(case, build, message, world, tmp_path, monkeypatch, capsys):
    before = snapshot(world["root"])
    code, err = run_cli(evaluate_module._hydra_entry, build(world, tmp_path), monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert snapshot(world["root"]) == before and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    "entry, argv",
    [
        ("evaluate", lambda w, t: [f"checkpoint={_ckpt(w, 'evil-data')}", f"output={t / 'e.json'}"]),
        ("generate", lambda w, t: [f"checkpoint={_ckpt(w, 'evil-data')}"]),
    ],
)
def test_a_checkpoint_never_chooses_where_data_comes_from(entry, argv, world, tmp_path, monkeypatch, capsys):
    """Its saved data.dir / data.url / data.download are ignored: no folder made, nothing downloaded."""
    monkeypatch.chdir(tmp_path)  # no data/ptb here
    module = evaluate_module if entry == "evaluate" else generate_module
    code, err = run_cli(module._hydra_entry, argv(world, tmp_path), monkeypatch, capsys)
    _assert_one_line(code, err, "no PTB files in data/ptb: run `make data`")
    assert not (world["root"] / "evil").exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- lm.generate

GENERATE_CASES = [
    ("temperature-text", ["temperature=abc"], "temperature"),
    ("temperature-zero", ["temperature=0"], "temperature must be a positive number, got 0.0"),
    ("temperature-negative", ["temperature=-1"], "temperature must be a positive number"),
    ("temperature-inf", ["temperature=inf"], "temperature must be a positive number"),
    ("words-zero", ["words=0"], "words must be a positive integer, got 0"),
    ("words-text", ["words=many"], "words"),
    ("words-float", ["words=1.5"], "words"),
    ("top-k-zero", ["top_k=0"], "top_k must be null or a positive integer"),
    ("seed-negative", ["seed=-1"], "seed must be a non-negative integer"),
    ("device-tpu", ["device=tpu"], "device must be cpu, cuda or auto"),
    ("unknown-key", ["foo=1"], "foo"),
]


@pytest.mark.parametrize("case, args, message", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_refuses_bad_settings(case, args, message, world, monkeypatch, capsys):
    code, err = run_cli(
        generate_module._hydra_entry, [f"checkpoint={world['run'] / 'checkpoint.pt'}", *args], monkeypatch, capsys
    )
    _assert_one_line(code, err, message)


GENERATE_CHECKPOINT_CASES = [
    ("missing", lambda w: w["root"] / "none.pt", "does not exist"),
    ("corrupt", lambda w: w["corrupt"], "corrupt or not a checkpoint"),
    ("text-file", lambda w: w["good"] / "train.txt", "corrupt or not a checkpoint"),
    ("duplicate-words", lambda w: w["damaged"]["duplicate-words"], "stored vocabulary has repeated"),
    ("wrong-shape", lambda w: w["damaged"]["wrong-shape"], "weights do not fit"),
    ("epoch-text", lambda w: w["damaged"]["epoch-text"], "'epoch' is a str"),
]


@pytest.mark.parametrize("case, path, message", GENERATE_CHECKPOINT_CASES, ids=[c[0] for c in GENERATE_CHECKPOINT_CASES])
def test_generate_refuses_bad_checkpoints(case, path, message, world, monkeypatch, capsys):
    before = snapshot(world["root"])
    code, err = run_cli(generate_module._hydra_entry, [f"checkpoint={path(world)}"], monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert snapshot(world["root"]) == before


def test_generate_with_no_checkpoint_is_one_line(monkeypatch, capsys):
    code, err = run_cli(generate_module._hydra_entry, [], monkeypatch, capsys)
    _assert_one_line(code, err, "checkpoint")


# ------------------------------------------------------------- lm.ensemble

ENSEMBLE_CASES = [
    (
        "eval-window-zero",
        lambda w, t: [str(w["run"]), str(w["other"]), "--out", str(t / "e"), "--eval-window", "0"],
        "--eval-window: must be a positive integer, got 0",
    ),
    (
        "eval-window-text",
        lambda w, t: [str(w["run"]), str(w["other"]), "--out", str(t / "e"), "--eval-window", "x"],
        "is not an integer",
    ),
    ("threads-negative", lambda w, t: [str(w["run"]), str(w["other"]), "--out", str(t / "e"), "--threads", "-1"], "--threads"),
    ("no-out", lambda w, t: [str(w["run"]), str(w["other"])], "the following arguments are required: --out"),
    ("unknown-option", lambda w, t: [str(w["run"]), "--out", str(t / "e"), "--bogus"], "unrecognized arguments: --bogus"),
    ("one-checkpoint", lambda w, t: [str(w["run"] / "checkpoint.pt"), "--out", str(t / "e")], "at least 2 checkpoints"),
    (
        "missing-member",
        lambda w, t: [str(w["run"] / "checkpoint.pt"), str(w["root"] / "none.pt"), "--out", str(t / "e")],
        "does not exist",
    ),
    (
        "out-under-a-file",
        lambda w, t: [
            str(w["run"] / "checkpoint.pt"),
            str(w["sweep-job"] / "checkpoint.pt"),
            "--out",
            str(w["root"] / "a-file" / "e"),
        ],
        "--out: cannot write",
    ),
    (
        "custom-needs-data-dir",
        lambda w, t: [str(w["run"] / "checkpoint.pt"), str(w["sweep-job"] / "checkpoint.pt"), "--out", str(t / "e")],
        "give its folder with --data-dir=PATH",
    ),
    (
        "other-words-same-size",
        lambda w, t: [
            str(w["run"] / "checkpoint.pt"),
            str(w["sweep-job"] / "checkpoint.pt"),
            "--out",
            str(t / "e"),
            "--data-dir",
            str(w["same-size"]),
        ],
        "vocabulary differs",
    ),
    (
        "members-of-other-vocabularies",
        lambda w, t: [
            str(w["run"] / "checkpoint.pt"),
            str(w["damaged"]["duplicate-words"]),
            "--out",
            str(t / "e"),
            "--data-dir",
            str(w["good"]),
        ],
        "another corpus or vocabulary",
    ),
    (
        "damaged-member",
        lambda w, t: [str(w["run"] / "checkpoint.pt"), str(w["damaged"]["no-config"]), "--out", str(t / "e")],
        "'config' is missing",
    ),
    (
        "device-tpu",
        lambda w, t: [str(w["run"]), str(w["other"]), "--out", str(t / "e"), "--device", "tpu"],
        "--device: invalid choice",
    ),
]


@pytest.mark.parametrize("case, build, message", ENSEMBLE_CASES, ids=[c[0] for c in ENSEMBLE_CASES])
def test_ensemble_refuses_before_work(case, build, message, world, tmp_path, capsys):
    before = snapshot(world["root"])
    code, err = run_main(ensemble_module.main, build(world, tmp_path), capsys)
    _assert_one_line(code, err, message)
    assert snapshot(world["root"]) == before and not (tmp_path / "e").exists()


# ------------------------------------------------------------- lm.report and lm.ablation

REPORT_CASES = [
    (
        "foreign-metrics-in-results",
        lambda w, t: ["--results", str(w["foreign"]), "--no-plots", "--readme", str(t / "none.md")],
        "is not a metrics.json written by this project (no valid 'name': missing)",
    ),
    (
        "broken-json-in-results",
        lambda w, t: ["--results", str(w["broken-json"]), "--no-plots", "--readme", str(t / "none.md")],
        "cannot be read as JSON",
    ),
    ("results-is-a-file", lambda w, t: ["--results", str(w["root"] / "a-file"), "--no-plots"], "is a file, not a folder of runs"),
    ("unknown-option", lambda w, t: ["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("case, build, message", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_refuses_foreign_files(case, build, message, world, tmp_path, capsys):
    before = snapshot(world["root"])
    code, err = run_main(report_module.main, build(world, tmp_path), capsys)
    _assert_one_line(code, err, message)
    assert snapshot(world["root"]) == before


def test_report_leaves_out_a_foreign_file_among_the_users_runs(world, tmp_path, capsys):
    """make table: a stray metrics.json under runs/ is named in one warning line and left out."""
    results = tmp_path / "results"
    results.mkdir()
    code, err = run_main(
        report_module.main,
        ["--results", str(results), "--no-plots", "--readme", str(tmp_path / "none.md"), "--with-runs", str(world["foreign"])],
        capsys,
    )
    _assert_one_line(code, err, "left out of the table", expected_code=0, prefix="warning: ")


ABLATION_CASES = [
    ("runs-missing", lambda w, t: [str(w["root"] / "nowhere"), "--out", str(t / "out")], "is not a folder of ablation runs"),
    ("no-finished-runs", lambda w, t: [str(w["empty"]), "--out", str(t / "out")], "no finished ablation runs under"),
    (
        "foreign-metrics",
        lambda w, t: [str(w["foreign"]), "--out", str(t / "out")],
        "is not a metrics.json written by this project",
    ),
    (
        "out-under-a-file",
        lambda w, t: [str(w["root"] / "sweep-1"), "--out", str(w["root"] / "a-file" / "x")],
        "--out: cannot write",
    ),
    ("no-runs-argument", lambda w, t: [], "the following arguments are required: runs"),
]


@pytest.mark.parametrize("case, build, message", ABLATION_CASES, ids=[c[0] for c in ABLATION_CASES])
def test_ablation_refuses_before_work(case, build, message, world, tmp_path, capsys):
    before = snapshot(world["root"])
    code, err = run_main(ablation_module.main, build(world, tmp_path), capsys)
    _assert_one_line(code, err, message)
    assert snapshot(world["root"]) == before and not (tmp_path / "out").exists()


# ------------------------------------------------------------- cause 6: paths the project makes are accepted back


def run_ok(entry, argv: list[str], monkeypatch) -> None:
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    try:
        entry()
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("where", ["sweep-job", "spaced"])
@pytest.mark.full
def test_paths_with_equals_commas_and_spaces_are_accepted(where, world, tmp_path, monkeypatch, capsys):
    """A sweep job's folder (trainer.seed=1,model.dropout=0.3) or a path with spaces, unquoted:
    lm.evaluate and lm.generate read it, and trainer.resume continues from it into such a folder."""
    checkpoint = world[where] / "checkpoint.pt"
    out = tmp_path / "e.json"
    run_ok(evaluate_module._hydra_entry, [f"checkpoint={checkpoint}", f"data_dir={world['good']}", f"output={out}"], monkeypatch)
    assert json.loads(out.read_text())["checkpoint"] == str(checkpoint)
    capsys.readouterr()
    run_ok(generate_module._hydra_entry, [f"checkpoint={checkpoint}", "words=3"], monkeypatch)
    assert len(capsys.readouterr().out.split()) >= 3
    run = tmp_path / "a=b,c d"
    run_ok(
        train_module._hydra_entry,
        [*tiny_overrides(world["good"], "trainer.max_steps=3"), f"trainer.resume={checkpoint}", f"hydra.run.dir={run}"],
        monkeypatch,
    )
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3


# ------------------------------------------------------------- lm.data (make data)


@pytest.mark.parametrize(
    "case, damage, message",
    [
        ("wrong-md5", lambda d: None, "has MD5"),
        ("folder-is-a-file", lambda d: None, "ptb.train.txt"),
    ],
)
def test_data_command_is_one_line(case, damage, message, tmp_path, monkeypatch, capsys):
    """``python -m lm.data FOLDER`` with every file present (so nothing is downloaded) but wrong."""
    from lm.data import __main__ as data_module

    folder = tmp_path / "ptb"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"ptb.{split}.txt").write_text("not the treebank\n")
    target = folder if case == "wrong-md5" else folder / "ptb.train.txt"
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prog", str(target)])
    with pytest.raises(SystemExit) as info:
        data_module.main()
    _assert_one_line(info.value.code, capsys.readouterr().err, message)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------- stop signals outside training


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_evaluation_stopped_by_a_signal_is_one_line(sig, world, tmp_path, monkeypatch, capsys):
    import signal

    signum = getattr(signal, sig)
    real = evaluation_module.evaluate_all

    def evaluate_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "evaluate_all", evaluate_then_signal)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    # as in a fresh process started from a terminal: the boundary's handler takes over SIGTERM and
    # SIGUSR1, and Ctrl-C raises KeyboardInterrupt (pytest started in the background by a script
    # inherits SIGINT ignored, which Python then keeps)
    signal.signal(signum, signal.default_int_handler if sig == "SIGINT" else signal.SIG_DFL)
    try:
        code, err = run_cli(
            evaluate_module._hydra_entry,
            [f"checkpoint={world['run'] / 'checkpoint.pt'}", f"data_dir={world['good']}", f"output={tmp_path / 'e.json'}"],
            monkeypatch,
            capsys,
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _assert_one_line(code, err, "stopped by SIG", expected_code=128 + signum, prefix="stopped by ")
    assert not (tmp_path / "e.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("entry", ["train", "evaluate", "generate"])
def test_cuda_without_a_gpu_names_the_key(entry, world, tmp_path, monkeypatch, capsys):
    argv = {
        "train": [*tiny_overrides(world["good"]), "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}"],
        "evaluate": [f"checkpoint={world['run']}", f"data_dir={world['good']}", "device=cuda", f"output={tmp_path / 'e.json'}"],
        "generate": [f"checkpoint={world['run']}", "device=cuda"],
    }[entry]
    module = {"train": train_module, "evaluate": evaluate_module, "generate": generate_module}[entry]
    before = snapshot(world["root"])
    code, err = run_cli(module._hydra_entry, argv, monkeypatch, capsys)
    key = "trainer.device" if entry == "train" else "device"
    _assert_one_line(code, err, f"{key} is cuda but no GPU is visible: use {key}=cpu")
    assert snapshot(world["root"]) == before and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_ensemble_on_cuda_without_a_gpu_names_the_option(world, tmp_path, capsys):
    before = snapshot(world["root"])
    code, err = run_main(
        ensemble_module.main,
        [
            str(world["run"]),
            str(world["sweep-job"]),
            "--out",
            str(tmp_path / "e"),
            "--data-dir",
            str(world["good"]),
            "--device",
            "cuda",
        ],
        capsys,
    )
    _assert_one_line(code, err, "--device is cuda but no GPU is visible: use --device=cpu")
    assert snapshot(world["root"]) == before and not (tmp_path / "e").exists()


def test_ensemble_takes_paths_with_glob_characters_literally(world, tmp_path, capsys):
    odd = tmp_path / "run[1]*"
    shutil.copytree(world["run"], odd)
    code, err = run_main(
        ensemble_module.main,
        [str(odd), str(world["sweep-job"]), "--out", str(tmp_path / "e"), "--data-dir", str(world["good"]), "--no-members"],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "ensemble.json").read_text())["checkpoints"][0] == str(odd / "checkpoint.pt")
