"""Trust III: what an outside red team did to the entry points with hostile and clumsy inputs.

Table-driven, run in-process like tests/test_bad_input.py (whose helpers these reuse). Every case
runs a command and checks its exit code, that stderr is exactly the one line expected (an error,
or a warning where the command goes on), that no traceback is printed, and that every file that
was there before is unchanged (bytes and modification time). Each case failed on the code before
this issue (a traceback, a replaced file, a wrong number with exit 0) and passes now.

1. one output policy (lm/infra/outputs.py): no output that is an input, nothing replaced that the
   command cannot show it wrote, files with the umask's mode;
2. finite or refused: the fused kernel's overflow, temperatures near 0, an upper bound per key;
3. OS errors wrapped by torch, datasets and matplotlib: one line naming the file, exit 2;
4. results files checked against their schema, nested fields included;
5. a batching change on resume only at an epoch boundary;
6. sweeps run every job and name the failed ones; path keys can be swept; reproduce checks its
   --train-arg before the first step;
7. the kernels that trained a run are recorded, and a resume on the other ones is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from test_bad_input import _assert_one_line, run_main, snapshot

from lm import ablation as ablation_module
from lm import ensemble as ensemble_module
from lm import evaluate as evaluate_module
from lm import generate as generate_module
from lm import kernels
from lm import report as report_module
from lm import reproduce as reproduce_module
from lm import train as train_module
from lm.engine.training import train
from lm.infra.faults import TrainingInterrupted

from helpers import REPO, tiny_overrides, train_config, write_corpus

CORES = os.cpu_count() or 1


def run_cli(entry, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """A Hydra entry point with ``argv``: (exit code, stdout, stderr); 0 when it returns."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code = 0
    try:
        entry()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        GlobalHydra.instance().clear()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_main_out(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """An argparse entry point: (exit code, stdout, stderr); 0 when it returns."""
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_clean(code: int, err: str, expected_code: int = 0) -> None:
    """Success with nothing on stderr."""
    assert code == expected_code, err
    assert err.strip() == "", err


def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _png(width: int, height: int) -> bytes:
    """The first bytes of a PNG of that size: all a plot's recogniser reads."""
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Corpora, runs and checkpoints the cases point at (each case copies what it may change)."""
    root = tmp_path_factory.mktemp("trust")
    good = write_corpus(root / "good")
    other_corpus = write_corpus(root / "good2", seed=5)
    run = root / "run"  # a short finished run: checkpoint, metrics.json, manifest.json, tb/
    train(train_config(tiny_overrides(good, "trainer.max_steps=2")), run)
    other = root / "other"  # another model of the same corpus
    train(train_config(tiny_overrides(good, "trainer.max_steps=2", "trainer.seed=2")), other)
    full = root / "full"  # one whole epoch: completed, its checkpoint at an epoch boundary
    train(train_config(tiny_overrides(good, "trainer.epochs=1")), full)
    mid = root / "mid"  # stopped by SIGTERM in the middle of epoch 1 of 2
    os.environ["LM_FAULT"] = "step:3:TERM"
    try:
        with pytest.raises(TrainingInterrupted):
            train(train_config(tiny_overrides(good, "trainer.epochs=2")), mid)
    finally:
        del os.environ["LM_FAULT"]
    copy = root / "copy"  # the run's checkpoint, byte for byte, under another name
    shutil.copytree(run, copy)
    (root / "link.pt").symlink_to(run / "checkpoint.pt")
    (root / "notes.json").write_text(json.dumps({"mine": True}))
    user_eval = root / "user-eval"  # a run folder where the user keeps an eval.json of their own
    shutil.copytree(run, user_eval)
    (user_eval / "eval.json").write_text(json.dumps({"checkpoint": "my own notes"}))
    ablation = root / "ablation"  # one finished placement, as make ablation writes it
    shutil.copytree(full, ablation / "zaremba")
    proj = root / "proj"  # a project checkout: README with its generated blocks, results/ beside it
    proj.mkdir()
    shutil.copyfile(REPO / "README.md", proj / "README.md")
    shutil.copytree(full, proj / "results" / "zaremba_small" / "seed-1")
    return {
        "root": root,
        "good": good,
        "good2": other_corpus,
        "run": run,
        "other": other,
        "full": full,
        "mid": mid,
        "copy": copy,
        "user-eval": user_eval,
        "ablation": ablation,
        "proj": proj,
    }


def _event_file(run: Path) -> Path:
    return next((run / "tb").glob("events.out.tfevents.*"))


# ================================================================ 1. one output policy

EVALUATE_OUTPUT_CASES = [
    (
        "output-is-the-checkpoint",
        lambda w: w["run"] / "checkpoint.pt",
        "is the checkpoint it evaluates, which this command reads",
    ),
    ("output-is-a-link-to-the-checkpoint", lambda w: w["root"] / "link.pt", "is the checkpoint it evaluates"),
    ("output-is-the-runs-metrics", lambda w: w["run"] / "metrics.json", "exists and is not an eval.json written by lm.evaluate"),
    ("output-is-the-runs-manifest", lambda w: w["run"] / "manifest.json", "exists and is not an eval.json"),
    ("output-is-a-tensorboard-file", lambda w: _event_file(w["run"]), "exists and is not an eval.json"),
    ("output-is-valid-txt", lambda w: w["good"] / "valid.txt", "is a file of the corpus it reads"),
    ("output-is-train-txt", lambda w: w["good"] / "train.txt", "is a file of the corpus it reads"),
    ("output-is-a-users-json", lambda w: w["root"] / "notes.json", "exists and is not an eval.json"),
    ("output-is-a-users-eval-json", lambda w: w["user-eval"] / "eval.json", "exists and is not an eval.json"),
]


@pytest.mark.parametrize("case, output, message", EVALUATE_OUTPUT_CASES, ids=[c[0] for c in EVALUATE_OUTPUT_CASES])
def test_evaluate_never_writes_over_its_inputs_or_a_file_it_did_not_write(case, output, message, w, monkeypatch, capsys):
    before = snapshot(w["root"])
    argv = [f"checkpoint={w['run'] / 'checkpoint.pt'}", f"data_dir={w['good']}", f"output={output(w)}"]
    code, _, err = run_cli(evaluate_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert snapshot(w["root"]) == before


def test_evaluate_default_output_beside_a_users_eval_json_is_refused(w, monkeypatch, capsys):
    before = snapshot(w["root"])
    argv = [f"checkpoint={w['user-eval']}", f"data_dir={w['good']}"]
    code, _, err = run_cli(evaluate_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, "eval.json exists and is not an eval.json written by lm.evaluate")
    assert snapshot(w["root"]) == before


ENSEMBLE_CASES = [
    (
        "same-path-twice",
        lambda w: [w["run"] / "checkpoint.pt", w["run"] / "checkpoint.pt"],
        "again: an average needs distinct models",
    ),
    ("folder-and-its-checkpoint", lambda w: [w["run"], w["run"] / "checkpoint.pt"], "again: an average needs distinct models"),
    (
        "a-link-to-a-member",
        lambda w: [w["run"] / "checkpoint.pt", w["root"] / "link.pt"],
        "again: an average needs distinct models",
    ),
    ("a-byte-for-byte-copy", lambda w: [w["run"], w["copy"]], "holds the same model as"),
    ("a-duplicate-among-three", lambda w: [w["run"], w["other"], w["copy"] / "checkpoint.pt"], "holds the same model as"),
]


@pytest.mark.parametrize("case, members, message", ENSEMBLE_CASES, ids=[c[0] for c in ENSEMBLE_CASES])
def test_ensemble_refuses_a_checkpoint_given_twice(case, members, message, w, tmp_path, capsys):
    before = snapshot(w["root"])
    argv = [*map(str, members(w)), "--out", str(tmp_path / "e"), "--data-dir", str(w["good"]), "--no-members"]
    code, err = run_main(ensemble_module.main, argv, capsys)
    _assert_one_line(code, err, message)
    assert snapshot(w["root"]) == before and not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("ensemble.json", json.dumps({"my": "notes"}), "ensemble.json exists and is not an ensemble.json written by lm.ensemble"),
        ("ensemble.log", "my lab notebook\n", "ensemble.log exists and is not an ensemble.log written by lm.ensemble"),
    ],
)
def test_ensemble_replaces_only_its_own_files(name, content, message, w, tmp_path, capsys):
    out = tmp_path / "e"
    out.mkdir()
    (out / name).write_text(content)
    before = snapshot(tmp_path)
    argv = [str(w["run"]), str(w["other"]), "--out", str(out), "--data-dir", str(w["good"]), "--no-members"]
    code, err = run_main(ensemble_module.main, argv, capsys)
    _assert_one_line(code, err, message)
    assert snapshot(tmp_path) == before


def _results_with_run(tmp_path: Path, w, *extra: tuple[str, bytes]) -> Path:
    results = tmp_path / "results"
    shutil.copytree(w["full"], results / "mine")
    for name, content in extra:
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_bytes(content)
    return results


REPORT_OUTPUT_CASES = [
    (
        "a-users-readme",
        [("README.md", b"# My results\n\nWritten by hand.\n")],
        [],
        "README.md exists and is not a README.md that lm.report generated",
    ),
    (
        "a-users-readme-no-plots",
        [("README.md", b"# My results\n")],
        ["--no-plots"],
        "README.md exists and is not a README.md that lm.report generated",
    ),
    (
        "a-users-curve-png",
        [("mine/curve.png", _png(1024, 768))],
        [],
        "curve.png exists and is not a curve.png that lm.report drew",
    ),
    (
        "a-text-curve-png",
        [("mine/curve.png", b"not an image")],
        [],
        "curve.png exists and is not a curve.png that lm.report drew",
    ),
]


@pytest.mark.parametrize("case, files, extra, message", REPORT_OUTPUT_CASES, ids=[c[0] for c in REPORT_OUTPUT_CASES])
def test_report_replaces_no_file_it_did_not_write(case, files, extra, message, w, tmp_path, capsys):
    results = _results_with_run(tmp_path, w, *files)
    before = snapshot(tmp_path)
    code, err = run_main(report_module.main, ["--results", str(results), "--readme", str(tmp_path / "none.md"), *extra], capsys)
    _assert_one_line(code, err, message)
    assert snapshot(tmp_path) == before


def test_report_with_runs_replaces_no_plot_of_a_user(w, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(w["full"], runs / "mine")
    (runs / "mine" / "curve.png").write_bytes(_png(300, 200))
    (tmp_path / "results").mkdir()
    before = snapshot(tmp_path)
    argv = ["--results", str(tmp_path / "results"), "--readme", str(tmp_path / "none.md"), "--with-runs", str(runs)]
    code, err = run_main(report_module.main, argv, capsys)
    _assert_one_line(code, err, "--with-runs: ")
    assert "curve.png exists and is not a curve.png that lm.report drew" in err
    assert snapshot(tmp_path) == before


def test_report_of_another_folder_leaves_the_project_readme_alone(w, tmp_path, capsys):
    """lm.report --results X rewrote the README's headline from X's runs; now only from the results/
    beside the README (make table), which still works."""
    proj = tmp_path / "proj"
    shutil.copytree(w["proj"], proj)
    other = _results_with_run(tmp_path, w)
    readme = (proj / "README.md").read_bytes()
    code, err = run_main(report_module.main, ["--results", str(other), "--readme", str(proj / "README.md"), "--no-plots"], capsys)
    _assert_clean(code, err)
    assert (proj / "README.md").read_bytes() == readme and (other / "README.md").is_file()
    code, err = run_main(report_module.main, ["--results", str(proj / "results"), "--readme", str(proj / "README.md")], capsys)
    _assert_clean(code, err)
    assert (proj / "README.md").read_bytes() != readme  # make table: the block from its own results/


ABLATION_OUTPUT_CASES = [
    (
        "a-users-readme",
        "README.md",
        b"# my ablation notes\n",
        "README.md exists and is not a README.md that lm.ablation generated",
    ),
    ("a-users-ablation-json", "ablation.json", b'{"mine": 1}', "ablation.json exists and is not an ablation.json written by"),
    (
        "a-users-plot",
        "valid_curves.png",
        _png(640, 480),
        "valid_curves.png exists and is not a valid_curves.png that lm.ablation",
    ),
    (
        "a-users-log-where-a-copy-goes",
        "zaremba/train.log",
        b"my log\n",
        "train.log exists and is not a copy of a run's train.log",
    ),
]


@pytest.mark.parametrize("case, name, content, message", ABLATION_OUTPUT_CASES, ids=[c[0] for c in ABLATION_OUTPUT_CASES])
def test_ablation_replaces_no_file_it_did_not_write(case, name, content, message, w, tmp_path, capsys):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_bytes(content)
    before = snapshot(tmp_path)
    code, err = run_main(ablation_module.main, [str(w["ablation"]), "--out", str(out)], capsys)
    _assert_one_line(code, err, message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("readme", ["users", "project"])
def test_reproduce_refuses_a_root_whose_readme_it_did_not_write(readme, w, tmp_path, capsys):
    """lm.reproduce --root . replaced the project's README with the generated table."""
    root = tmp_path / "root"
    root.mkdir()
    if readme == "users":
        (root / "README.md").write_text("# my experiments\n")
    else:
        shutil.copyfile(REPO / "README.md", root / "README.md")
    before = snapshot(tmp_path)
    code, err = run_main(reproduce_module.main, ["--root", str(root), "--dry-run"], capsys)
    _assert_one_line(code, err, "README.md exists and is not a README.md that lm.report generated")
    assert snapshot(tmp_path) == before


FIGURES_CASES = [
    (
        "a-users-readme",
        [("README.md", b"# my figures\n")],
        [],
        "README.md exists and is not a README.md that make figures generated",
    ),
    (
        "a-users-picture",
        [("placement.png", _png(800, 600))],
        [],
        "placement.png exists and is not a placement.png that make figures",
    ),
    ("seed-2^64", [], ["--seed", "18446744073709551616"], "--seed: must be at most 18446744073709551615"),
]


@pytest.mark.parametrize("case, files, extra, message", FIGURES_CASES, ids=[c[0] for c in FIGURES_CASES])
def test_figures_replace_no_file_they_did_not_write(case, files, extra, message, w, tmp_path, capsys):
    from lm import figures as figures_module

    out = tmp_path / "figures"
    out.mkdir()
    for name, content in files:
        (out / name).write_bytes(content)
    before = snapshot(tmp_path)
    code, err = run_main(figures_module.main, ["--out", str(out), "--data-dir", str(w["good"]), *extra], capsys)
    _assert_one_line(code, err, message)
    assert snapshot(tmp_path) == before


OVERWRITE_REFUSED_CASES = [
    ("a-users-metrics-json", "metrics.json", json.dumps({"loss": 1.0}), ["trainer.overwrite=true"]),
    ("a-users-checkpoint-pt", "checkpoint.pt", "not a checkpoint", ["trainer.overwrite=true"]),
    ("a-users-manifest", "manifest.json", json.dumps({"files": ["notes.txt"]}), ["trainer.overwrite=true"]),
    ("a-users-manifest-no-overwrite", "manifest.json", json.dumps({"files": ["notes.txt"]}), []),
]


@pytest.mark.parametrize("case, name, content, extra", OVERWRITE_REFUSED_CASES, ids=[c[0] for c in OVERWRITE_REFUSED_CASES])
def test_train_never_replaces_a_file_no_run_wrote(case, name, content, extra, w, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / name).write_text(content)
    (folder / "notes.txt").write_text("keep me\n")
    before = snapshot(tmp_path)
    argv = [*tiny_overrides(w["good"], "trainer.max_steps=1"), *extra, f"hydra.run.dir={folder}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, f"{folder / name} was not written by a run of lm.train")
    assert snapshot(tmp_path) == before


def test_overwrite_into_a_folder_without_a_run_removes_nothing(w, tmp_path, monkeypatch, capsys):
    """trainer.overwrite=true into a folder that held no run deleted the user's eval.json and tb/."""
    folder = tmp_path / "folder"
    (folder / "tb").mkdir(parents=True)
    (folder / "tb" / "mine.csv").write_text("step,loss\n1,2\n")
    (folder / "eval.json").write_text(json.dumps({"my": "evaluation"}))
    before = snapshot(tmp_path)
    argv = [*tiny_overrides(w["good"], "trainer.max_steps=1"), "trainer.overwrite=true", f"hydra.run.dir={folder}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_clean(code, err)
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before and (folder / "metrics.json").is_file()


def test_overwrite_removes_only_what_the_replaced_run_wrote(w, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "folder"
    shutil.copytree(w["run"], folder)
    old_events = _event_file(folder)
    (folder / "tb" / "mine.csv").write_text("step,loss\n")
    (folder / "notes.txt").write_text("keep me\n")
    kept = {k: v for k, v in snapshot(tmp_path).items() if k.endswith(("mine.csv", "notes.txt"))}
    argv = [*tiny_overrides(w["good"], "trainer.max_steps=1"), "trainer.overwrite=true", f"hydra.run.dir={folder}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_clean(code, err)
    assert not old_events.exists() and json.loads((folder / "metrics.json").read_text())["steps"] == 1
    assert {k: v for k, v in snapshot(tmp_path).items() if k in kept} == kept


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
@pytest.mark.full
def test_written_files_take_the_umask(mask, mode, w, tmp_path, monkeypatch, capsys):
    """Every file was written 0600 (mkstemp's mode), whatever the umask."""
    previous = os.umask(mask)
    try:
        run_dir = tmp_path / "run"
        argv = [*tiny_overrides(w["good"], "trainer.max_steps=1"), f"hydra.run.dir={run_dir}"]
        code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
        _assert_clean(code, err)
        argv = [f"checkpoint={run_dir}", f"data_dir={w['good']}"]
        code, _, err = run_cli(evaluate_module._hydra_entry, argv, monkeypatch, capsys)
        _assert_clean(code, err)
        code, err = run_main(report_module.main, ["--results", str(tmp_path), "--readme", str(tmp_path / "none.md")], capsys)
        _assert_clean(code, err)
    finally:
        os.umask(previous)
    for name in ("checkpoint.pt", "metrics.json", "manifest.json", "eval.json", "curve.png"):
        assert (run_dir / name).stat().st_mode & 0o777 == mode, name
    assert (tmp_path / "README.md").stat().st_mode & 0o777 == mode


# ================================================================ 2. finite or refused

DIVERGING = ("trainer.max_steps=5", "optim.lr=1e37", "optim.max_grad_norm=1e30")


@pytest.mark.parametrize(
    "mode, lr, message",
    [
        ("stop", "1e37", "non-finite loss or gradient norm at epoch 1, step 3"),
        ("stop", "3e37", "non-finite loss or gradient norm at epoch 1, step 2"),
        ("skip", "3e37", "non-finite perplexity at epoch 1 (train "),
    ],
)
def test_a_diverging_loss_in_the_fused_kernel_is_a_numerical_fault(mode, lr, message, w, tmp_path, monkeypatch, capsys):
    """It raised 'value cannot be converted to type float without overflow' (exit 1, a traceback),
    which trainer.nonfinite=skip could not skip; now it is non-finite like the PyTorch path's."""
    if kernels.fused() is None:
        pytest.skip("the fused kernels cannot be built here")
    run_dir = tmp_path / "run"
    argv = [*tiny_overrides(w["good"], *DIVERGING), f"optim.lr={lr}", f"trainer.nonfinite={mode}", f"hydra.run.dir={run_dir}"]
    code, out, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, message, expected_code=3)
    assert not (run_dir / "metrics.json").exists()
    if mode == "skip":  # the overflowing steps were skipped: the steps trained have a finite training perplexity
        assert "(train inf" not in err and "(train nan" not in err


def test_the_fused_and_pytorch_paths_stop_at_the_same_step(w, tmp_path, monkeypatch, capsys, no_fused):
    argv = [*tiny_overrides(w["good"], *DIVERGING), f"hydra.run.dir={tmp_path / 'run'}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 2 and "Traceback" not in err, err
    assert (
        lines[0].startswith("warning: training on PyTorch's kernels")
        and "non-finite loss or gradient norm at epoch 1, step 3" in lines[1]
    )


def test_the_fused_loss_overflows_to_inf():
    fused = kernels.fused()
    h = torch.full((64, 4), 1e37)
    weight = torch.eye(8, 4) * 3
    loss, _ = fused.linear_nll_forward(h, weight, torch.zeros(8), torch.zeros(64, dtype=torch.long) + 7)
    assert loss.dtype == torch.float32 and torch.isinf(loss)


def _greedy(checkpoint: Path, prompt: list[str], words: int) -> list[str]:
    from lm.engine.generation import checkpoint_vocab
    from lm.engine.runtime import build_model_from_checkpoint
    from lm.infra.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    vocab = checkpoint_vocab(ckpt)
    model = build_model_from_checkpoint(ckpt, vocab).eval()
    state, ids, out = model.init_state(1), [vocab[word] for word in prompt], []
    with torch.no_grad():
        logits, state = model(torch.tensor([ids]), state)
        for _ in range(words):
            next_id = int(logits[0, -1].argmax())
            out.append(vocab.itos[next_id])
            logits, state = model(torch.tensor([[next_id]]), state)
    return out


@pytest.mark.parametrize("temperature", ["1e-40", "1e-300", "5e-324"])
def test_generation_near_temperature_zero_is_greedy(temperature, w, monkeypatch, capsys):
    """At 1e-40 it printed the last word of the vocabulary again and again (softmax of inf is NaN)."""
    before = snapshot(w["root"])
    argv = [f"checkpoint={w['full']}", "prompt=the cat", "words=12", f"temperature={temperature}"]
    code, out, err = run_cli(generate_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_clean(code, err)
    expected = " ".join(_greedy(w["full"] / "checkpoint.pt", ["the", "cat"], 12)).replace(" <eos> ", "\n").replace("<eos>", "\n")
    assert out.split() == ("the cat " + expected).split()
    assert snapshot(w["root"]) == before


TRAIN_BOUND_CASES = [
    ("seed-2^64", ["trainer.seed=18446744073709551616"], "trainer.seed must be at most 18446744073709551615"),
    ("hidden-size-1e9", ["model.hidden_size=1000000000"], "model.hidden_size=1000000000 needs about"),
    ("hidden-size-2^40", ["model.hidden_size=1099511627776"], "model.hidden_size must be at most 2147483647"),
    ("threads-1e11", ["trainer.threads=100000000000"], "trainer.threads must be at most"),
    ("threads-above-the-cores", [f"trainer.threads={CORES + 1}"], f"trainer.threads must be at most {CORES}"),
    ("epochs-2^63", ["trainer.epochs=9223372036854775807"], "trainer.epochs must be at most"),
    ("max-steps-2^63", ["trainer.max_steps=9223372036854775807"], "trainer.max_steps must be at most"),
    ("log-every-2^63", ["trainer.log_every=9223372036854775807"], "trainer.log_every must be at most"),
    ("eval-window-2^63", ["trainer.eval_window=9223372036854775807"], "trainer.eval_window must be at most"),
    ("decay-start-2^63", ["optim.decay_start_epoch=9223372036854775807"], "optim.decay_start_epoch must be at most"),
    ("lr-above-fp32", ["optim.lr=1e39"], "optim.lr must be at most"),
    ("grad-norm-inf", ["optim.max_grad_norm=inf"], "optim.max_grad_norm must be at most"),
]


@pytest.mark.parametrize("case, args, message", TRAIN_BOUND_CASES, ids=[c[0] for c in TRAIN_BOUND_CASES])
def test_every_training_number_has_an_upper_bound(case, args, message, w, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    argv = [*tiny_overrides(w["good"], "trainer.max_steps=1"), *args, f"hydra.run.dir={run_dir}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert not run_dir.exists()


OTHER_BOUND_CASES = [
    ("evaluate", ["eval.mc_samples=100000000"], "eval.mc_samples=100000000 needs about"),
    ("evaluate", ["eval.mc_samples=2", "eval.mc_seed=18446744073709551616"], "eval.mc_seed must be at most"),
    ("evaluate", ["threads=100000000000"], "threads must be at most"),
    ("evaluate", ["eval_window=9223372036854775807"], "eval_window must be at most"),
    ("generate", ["seed=18446744073709551616"], "seed must be at most"),
    ("generate", ["top_k=1099511627776"], "top_k must be at most"),
]


@pytest.mark.parametrize("entry, args, message", OTHER_BOUND_CASES, ids=[f"{c[0]}-{c[1][-1]}" for c in OTHER_BOUND_CASES])
def test_evaluate_and_generate_numbers_have_upper_bounds_checked_before_any_work(
    entry, args, message, w, tmp_path, monkeypatch, capsys
):
    """eval.mc_samples=1e8 ended in a traceback after the standard evaluation had run."""
    before = snapshot(w["root"])
    module = evaluate_module if entry == "evaluate" else generate_module
    argv = [f"checkpoint={w['run']}", *args]
    if entry == "evaluate":
        argv += [f"data_dir={w['good']}", f"output={tmp_path / 'e.json'}"]
    code, out, err = run_cli(module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert out == "" and snapshot(w["root"]) == before and not (tmp_path / "e.json").exists()


def test_ensemble_threads_have_an_upper_bound(w, tmp_path, capsys):
    argv = [str(w["run"]), str(w["other"]), "--out", str(tmp_path / "e"), "--threads", "100000000000"]
    code, err = run_main(ensemble_module.main, argv, capsys)
    _assert_one_line(code, err, f"--threads: must be at most {CORES}")
    assert not (tmp_path / "e").exists()


# ================================================================ 3. OS errors through any library


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(name)``: the atomic write of ``name`` goes to /dev/full, where every write fails
    with ENOSPC as on a full disk (the library writing it meets the real error)."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    real_mkstemp, real_fchmod = tempfile.mkstemp, os.fchmod

    def arm(name: str) -> None:
        def mkstemp(*args, prefix: str = "", **kwargs):
            fd, path = real_mkstemp(*args, prefix=prefix, **kwargs)
            if not prefix.startswith(name + "."):
                return fd, path
            os.close(fd)
            return os.open("/dev/full", os.O_WRONLY), path

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    def fchmod(fd: int, mode: int) -> None:  # never the device's own mode
        if Path(f"/proc/self/fd/{fd}").resolve() != Path("/dev/full"):
            real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod)
    return arm


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.json", "manifest.json"])
def test_a_full_disk_while_training_is_one_line(name, w, tmp_path, monkeypatch, capsys, full_disk):
    """torch.save wraps ENOSPC in a RuntimeError: exit 1 and two tracebacks; docs promise exit 2, one line."""
    full_disk(name)
    argv = [*tiny_overrides(w["good"], "trainer.max_steps=1"), f"hydra.run.dir={tmp_path / 'run'}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, f"{tmp_path / 'run' / name}: No space left on device")
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_full_disk_writing_eval_json_is_one_line(w, tmp_path, monkeypatch, capsys, full_disk):
    full_disk("eval.json")
    before = snapshot(w["root"])
    argv = [f"checkpoint={w['run']}", f"data_dir={w['good']}", f"output={tmp_path / 'eval.json'}"]
    code, _, err = run_cli(evaluate_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, f"{tmp_path / 'eval.json'}: No space left on device")
    assert snapshot(w["root"]) == before


def test_a_full_disk_writing_ensemble_json_is_one_line(w, tmp_path, capsys, full_disk):
    full_disk("ensemble.json")
    argv = [str(w["run"]), str(w["other"]), "--out", str(tmp_path / "e"), "--data-dir", str(w["good"]), "--no-members"]
    code, err = run_main(ensemble_module.main, argv, capsys)
    _assert_one_line(code, err, f"{tmp_path / 'e' / 'ensemble.json'}: No space left on device")


@pytest.mark.parametrize("name", ["README.md", "curve.png"])
def test_a_full_disk_writing_the_report_is_one_line(name, w, tmp_path, capsys, full_disk):
    """curve.png is written by matplotlib (and Pillow) into the atomic write's file."""
    results = _results_with_run(tmp_path, w)
    full_disk(name)
    code, err = run_main(report_module.main, ["--results", str(results), "--readme", str(tmp_path / "none.md")], capsys)
    _assert_one_line(code, err, f"{name}: No space left on device")


def test_a_full_disk_writing_the_ablation_plot_is_one_line(w, tmp_path, capsys, full_disk):
    full_disk("valid_curves.png")
    code, err = run_main(ablation_module.main, [str(w["ablation"]), "--out", str(tmp_path / "out")], capsys)
    _assert_one_line(code, err, f"{tmp_path / 'out' / 'valid_curves.png'}: No space left on device")


def test_a_full_disk_under_the_datasets_cache_is_one_line(tmp_path, monkeypatch, capsys):
    """datasets wraps the OSError in a DatasetGenerationError: exit 1 and a traceback before."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(ArrowWriter, "write_table", no_space)
    corpus = write_corpus(tmp_path / "corpus", seed=11)
    argv = [*tiny_overrides(corpus, "trainer.max_steps=1"), f"hydra.run.dir={tmp_path / 'run'}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, "No space left on device: check the path, its permissions and the free disk space")


# ================================================================ 4. results files checked against their schema

METRICS_DAMAGE = [
    ("eval-empty", lambda m: m.update(eval={}), "no valid 'eval.valid': missing"),
    ("epochs-of-empty-records", lambda m: m.update(epochs=[{}]), "no valid 'epochs[0].epoch': missing"),
    ("hardware-text", lambda m: m.update(hardware="x"), "no valid 'hardware': a string, expected an object"),
    ("test-batched-text", lambda m: m["eval"]["test"].update(batched="x"), "no valid 'eval.test.batched': a string"),
    ("config-model-number", lambda m: m["config"].update(model=5), "no valid 'config.model': an integer, expected an object"),
]


@pytest.mark.parametrize("case, damage, field", METRICS_DAMAGE, ids=[c[0] for c in METRICS_DAMAGE])
def test_make_table_leaves_out_a_damaged_run_of_the_user_with_one_warning(case, damage, field, w, tmp_path, capsys):
    """A runs/**/metrics.json with eval: {} (and the others) crashed make table, and with it the end
    of every make train-*."""
    runs = tmp_path / "runs"
    shutil.copytree(w["full"], runs / "bad")
    _rewrite(runs / "bad" / "metrics.json", damage)
    shutil.copytree(w["full"], runs / "good")
    (tmp_path / "results").mkdir()
    before = snapshot(runs / "bad")
    argv = ["--results", str(tmp_path / "results"), "--readme", str(tmp_path / "none.md"), "--with-runs", str(runs)]
    code, out, err = run_main_out(report_module.main, argv, capsys)
    _assert_one_line(code, err, f"{runs / 'bad' / 'metrics.json'} is not a metrics.json", expected_code=0, prefix="warning: ")
    assert field in err and "`runs/good`" in out and "`runs/bad`" not in out
    assert snapshot(runs / "bad") == before


@pytest.mark.parametrize("case, damage, field", METRICS_DAMAGE, ids=[c[0] for c in METRICS_DAMAGE])
def test_a_damaged_committed_run_is_one_line_naming_the_field(case, damage, field, w, tmp_path, capsys):
    results = _results_with_run(tmp_path, w)
    _rewrite(results / "mine" / "metrics.json", damage)
    before = snapshot(tmp_path)
    code, err = run_main(report_module.main, ["--results", str(results), "--readme", str(tmp_path / "none.md")], capsys)
    _assert_one_line(code, err, field)
    assert snapshot(tmp_path) == before


def _ensemble_json(w) -> dict:
    return {
        "name": "zaremba_small",
        "n_models": 2,
        "checkpoints": [str(w["run"] / "checkpoint.pt"), str(w["other"] / "checkpoint.pt")],
        "valid_ppl": 90.0,
        "test_ppl": 88.0,
        "results": {"test": {"batched": {"ppl": 91.0}}},
    }


def _eval_json(w) -> dict:
    numbers = {"valid": {"batched": {"ppl": 82.0}}, "test": {"stream": {"ppl": 79.9}}}
    return {"checkpoint": str(w["full"] / "checkpoint.pt"), "results": numbers, "mc_dropout": {"samples": 2, "results": numbers}}


RESULT_FILE_DAMAGE = [
    (
        "ensemble-results-empty",
        "average/ensemble.json",
        _ensemble_json,
        lambda e: e.update(results={}),
        "'results.test': missing",
    ),
    (
        "ensemble-checkpoints-numbers",
        "average/ensemble.json",
        _ensemble_json,
        lambda e: e.update(checkpoints=[1, 2]),
        "'checkpoints[0]'",
    ),
    ("ensemble-hardware-text", "average/ensemble.json", _ensemble_json, lambda e: e.update(hardware="x"), "no valid 'hardware'"),
    ("eval-mc-dropout-empty", "mine/eval.json", _eval_json, lambda e: e.update(mc_dropout={}), "'mc_dropout.samples': missing"),
    ("eval-results-without-test", "mine/eval.json", _eval_json, lambda e: e["results"].pop("test"), "'results.test': missing"),
]


@pytest.mark.parametrize("case, name, make, damage, field", RESULT_FILE_DAMAGE, ids=[c[0] for c in RESULT_FILE_DAMAGE])
def test_damaged_ensemble_and_eval_files_are_one_line_naming_the_field(case, name, make, damage, field, w, tmp_path, capsys):
    content = make(w)
    damage(content)
    results = _results_with_run(tmp_path, w, (name, json.dumps(content).encode()))
    before = snapshot(tmp_path)
    code, err = run_main(report_module.main, ["--results", str(results), "--readme", str(tmp_path / "none.md")], capsys)
    _assert_one_line(code, err, field)
    assert snapshot(tmp_path) == before


ABLATION_DAMAGE = [
    ("no-epochs", lambda m: m.update(epochs=[]), "no valid 'epochs': an empty list"),
    ("no-dropout-variant", lambda m: m["config"]["model"].pop("dropout_variant"), "'config.model.dropout_variant': missing"),
    ("lr-text", lambda m: m["epochs"][0].update(lr="x"), "no valid 'epochs[0].lr': a string"),
]


@pytest.mark.parametrize("case, damage, field", ABLATION_DAMAGE, ids=[c[0] for c in ABLATION_DAMAGE])
def test_ablation_leaves_out_a_damaged_placement_with_one_warning(case, damage, field, w, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(w["ablation"], runs)
    shutil.copytree(w["full"], runs / "none")
    _rewrite(runs / "none" / "metrics.json", damage)
    before = snapshot(runs)
    code, err = run_main(ablation_module.main, [str(runs), "--out", str(tmp_path / "out")], capsys)
    _assert_one_line(code, err, field, expected_code=0, prefix="warning: left out of the ablation: ")
    assert snapshot(runs) == before and "| `zaremba` |" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("case, damage, field", ABLATION_DAMAGE, ids=[c[0] for c in ABLATION_DAMAGE])
def test_ablation_with_only_damaged_placements_is_one_line(case, damage, field, w, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(w["full"], runs / "none")
    _rewrite(runs / "none" / "metrics.json", damage)
    before = snapshot(tmp_path)
    code, err = run_main(ablation_module.main, [str(runs), "--out", str(tmp_path / "out")], capsys)
    _assert_one_line(code, err, "no finished ablation runs under")
    assert field in err and snapshot(tmp_path) == before


# ================================================================ 5. resume: a change of batching at an epoch boundary only

MID_EPOCH_CASES = [
    ("larger-batch", ["data.batch_size=8"], "data.batch_size changes the windows of an epoch"),
    ("smaller-batch", ["data.batch_size=2"], "data.batch_size changes the windows of an epoch"),
    ("longer-bptt", ["data.bptt=7"], "data.bptt changes the windows of an epoch"),
]


@pytest.mark.parametrize("case, change, message", MID_EPOCH_CASES, ids=[c[0] for c in MID_EPOCH_CASES])
def test_a_batching_change_from_a_mid_epoch_checkpoint_is_refused(case, change, message, w, tmp_path, monkeypatch, capsys):
    """trainer.allow_changes=[data.batch_size], as the refusal suggests: a larger batch crashed, a
    smaller one (or another bptt) trained a mixed windowing recorded as a complete epoch."""
    folder = tmp_path / "mid"
    shutil.copytree(w["mid"], folder)
    before = snapshot(tmp_path)
    key = change[0].split("=")[0]
    argv = [
        *tiny_overrides(w["good"], "trainer.epochs=2"),
        *change,
        "trainer.resume=auto",
        f"trainer.allow_changes=[{key}]",
        f"hydra.run.dir={folder}",
    ]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, message)
    assert "finish that epoch first (resume with" in err and snapshot(tmp_path) == before


@pytest.mark.parametrize("change", ["data.batch_size=2", "data.bptt=7"])
@pytest.mark.full
def test_a_batching_change_at_an_epoch_boundary_trains_whole_epochs(change, w, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "full"
    shutil.copytree(w["full"], folder)
    key = change.split("=")[0]
    argv = [
        *tiny_overrides(w["good"], "trainer.epochs=2"),
        change,
        "trainer.resume=auto",
        f"trainer.allow_changes=[{key}]",
        f"hydra.run.dir={folder}",
    ]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_clean(code, err)
    metrics = json.loads((folder / "metrics.json").read_text())
    first, second = metrics["epochs"]
    assert metrics["completed"] and first["steps"] == first["windows"] and second["steps"] == second["windows"]
    assert first["windows"] != second["windows"]
    assert [c["key"] for c in metrics["resume_changes"]] == [key]


# ================================================================ 6. sweeps, path sweeps, reproduce's --train-arg


def test_a_sweep_runs_every_job_and_names_the_failed_ones(w, tmp_path, monkeypatch, capsys):
    """A multirun stopped at the first job that exited 2 or 3; later jobs never ran, nothing named them."""
    sweep = tmp_path / "sweep"
    argv = ["-m", *tiny_overrides(w["good"], "trainer.max_steps=2"), "data.batch_size=100000,4", f"hydra.sweep.dir={sweep}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, "1 sweep job(s) failed: data.batch_size-100000")
    assert "(exit 2: a split of" in err
    assert len(list(sweep.glob("*/metrics.json"))) == 1


def test_a_sweep_names_a_job_that_diverged_with_exit_3(w, tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    argv = [
        "-m",
        *tiny_overrides(w["good"], "trainer.max_steps=5", "optim.max_grad_norm=1e30"),
        "optim.lr=1e37,1.0",
        f"hydra.sweep.dir={sweep}",
    ]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, "1 sweep job(s) failed: ", expected_code=3)
    assert "optim.lr-1e+37" in err and "(exit 3: non-finite loss" in err
    assert len(list(sweep.glob("*/metrics.json"))) == 1


def test_a_path_key_can_be_swept(w, tmp_path, monkeypatch, capsys):
    """data.dir=a,b became one literal path 'a,b'; now one job per folder, each in a folder of its own."""
    sweep = tmp_path / "sweep"
    overrides = [a for a in tiny_overrides(w["good"], "trainer.max_steps=1") if not a.startswith("data.dir=")]
    argv = ["-m", *overrides, f"data.dir={w['good']},{w['good2']}", f"hydra.sweep.dir={sweep}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_clean(code, err)
    dirs = sorted(json.loads(p.read_text())["config"]["data"]["dir"] for p in sweep.glob("*/metrics.json"))
    assert dirs == sorted([str(w["good"]), str(w["good2"])])


REPRODUCE_ARG_CASES = [
    ("text-for-a-number", "model.hidden_size=abc", "--train-arg: model.hidden_size"),
    ("zero-epochs", "trainer.epochs=0", "--train-arg: trainer.epochs must be a positive integer"),
    ("unknown-key", "model.foo=1", "--train-arg: "),
    ("negative-lr", "optim.lr=-1", "--train-arg: optim.lr must be a positive number"),
]


@pytest.mark.parametrize("case, arg, message", REPRODUCE_ARG_CASES, ids=[c[0] for c in REPRODUCE_ARG_CASES])
def test_reproduce_checks_each_train_arg_before_the_first_step(case, arg, message, tmp_path, capsys):
    """A bad --train-arg surfaced only in a step's log, with exit 1."""
    code, err = run_main(reproduce_module.main, ["--root", str(tmp_path / "root"), "--train-arg", arg, "--dry-run"], capsys)
    _assert_one_line(code, err, message)
    assert not (tmp_path / "root").exists()


# ================================================================ 7. which kernels trained the run


@pytest.fixture
def no_fused(tmp_path, monkeypatch):
    """The fused kernels cannot be built here (the extension cache cannot be created, as under a
    read-only ~/.cache); restored afterwards."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "cache"))
    kernels.fused.cache_clear()
    yield
    monkeypatch.undo()
    kernels.fused.cache_clear()


def test_a_run_on_pytorchs_kernels_says_so_and_records_it(w, tmp_path, monkeypatch, capsys, no_fused):
    """A read-only ~/.cache switched training to the unfused kernels, whose masks differ, silently."""
    argv = [*tiny_overrides(w["good"], "trainer.max_steps=2"), f"hydra.run.dir={tmp_path / 'run'}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(
        code, err, "they draw other dropout masks, so this seed gives other numbers", expected_code=0, prefix="warning: "
    )
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["kernels"] == "pytorch"
    assert json.loads((w["run"] / "metrics.json").read_text())["kernels"] == "fused"


def test_a_resume_on_other_kernels_is_refused(w, tmp_path, monkeypatch, capsys, no_fused):
    folder = tmp_path / "mid"
    shutil.copytree(w["mid"], folder)
    before = snapshot(tmp_path)
    argv = [*tiny_overrides(w["good"], "trainer.epochs=2"), "trainer.resume=auto", f"hydra.run.dir={folder}"]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, "trained on the fused kernels, this run would train on the pytorch ones")
    assert snapshot(tmp_path) == before


@pytest.mark.full
def test_a_resume_on_other_kernels_goes_on_when_allowed_and_is_recorded(w, tmp_path, monkeypatch, capsys, no_fused):
    folder = tmp_path / "mid"
    shutil.copytree(w["mid"], folder)
    argv = [
        *tiny_overrides(w["good"], "trainer.epochs=2"),
        "trainer.resume=auto",
        "trainer.allow_changes=[kernels]",
        f"hydra.run.dir={folder}",
    ]
    code, _, err = run_cli(train_module._hydra_entry, argv, monkeypatch, capsys)
    _assert_one_line(code, err, "warning: training on PyTorch's kernels", expected_code=0, prefix="warning: ")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["kernels"] == "pytorch"
    assert [(c["key"], c["from"], c["to"]) for c in metrics["resume_changes"]] == [("kernels", "fused", "pytorch")]
