from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lm.config import compose
from lm.data.batching import batchify
from lm.engine.evaluation import evaluate, evaluate_mixture, perplexity, run_evaluation
from lm.engine.training import train
from lm.infra.checkpoint import CheckpointError
from lm.model.language_model import LanguageModel

from helpers import tiny_overrides, train_config, write_corpus


def test_perplexity_is_token_weighted_exp_of_mean_nll():
    assert perplexity(10 * math.log(100.0), 10) == pytest.approx(100.0)
    assert perplexity(0.0, 5) == 1.0
    # a uniform guess over V words has perplexity V
    logits = torch.zeros(7, 50)
    nll = torch.nn.functional.cross_entropy(logits, torch.randint(0, 50, (7,)), reduction="sum")
    assert perplexity(float(nll), 7) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_stream_protocol_window_length_does_not_change_the_numbers():
    """Long windows with the state carried are the same computation as one token at a time."""
    torch.manual_seed(0)
    model = LanguageModel(40, 12, 2, 0.5, 0.1)
    stream = batchify(torch.randint(0, 40, (301,)), 1)
    one_at_a_time = evaluate(model, stream, 1)
    assert one_at_a_time[1] == 300  # every token after the first
    for window in (7, 64, 1000):
        nll, count = evaluate(model, stream, window)
        assert count == 300 and nll == pytest.approx(one_at_a_time[0], rel=1e-5)


def test_evaluation_resets_state_and_restores_training_mode():
    torch.manual_seed(0)
    model = LanguageModel(40, 12, 2, 0.5, 0.1).train()
    data = batchify(torch.randint(0, 40, (200,)), 4)
    assert evaluate(model, data, 5) == evaluate(model, data, 5)
    assert model.training


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    corpus = write_corpus(root / "corpus")
    train(train_config(tiny_overrides(corpus, "trainer.max_steps=30")), root / "out")
    return root


def test_evaluate_command_matches_training_numbers(tiny_run: Path):
    out = tiny_run / "eval.json"
    report = run_evaluation(
        compose(
            "evaluate",
            [
                f"checkpoint={tiny_run / 'out' / 'checkpoint.pt'}",
                f"data_dir={tiny_run / 'corpus'}",
                f"output={out}",
                "device=cpu",
            ],
        )
    )
    metrics = json.loads((tiny_run / "out" / "metrics.json").read_text())
    assert report["results"]["test"]["stream"]["ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-9)
    assert report["results"]["valid"]["batched"]["ppl"] == pytest.approx(metrics["valid_ppl"], rel=1e-9)
    assert json.loads(out.read_text())["results"]["test"]["stream"]["tokens"] == metrics["test_predictions"]
    assert report["precision"] == {**metrics["precision"], "trainer.precision": "fp32", "products": "ieee fp32"}


@pytest.mark.full
def test_mc_evaluation_records_its_time_and_hardware_and_the_report_shows_them(tiny_run: Path, tmp_path: Path):
    import shutil

    from lm.reporting.publish import write_report

    run = tmp_path / "results" / "run"
    shutil.copytree(tiny_run / "out", run)
    report = run_evaluation(
        compose("evaluate", [f"checkpoint={run}", f"data_dir={tiny_run / 'corpus'}", "device=cpu", "eval.mc_samples=3"])
    )
    mc = report["mc_dropout"]
    assert mc["samples"] == 3 and mc["seconds"] > 0 and report["seconds"] > 0
    assert report["threads"] == torch.get_num_threads() and "cpu" in report["hardware"] and report["device"] == "cpu"
    assert json.loads((run / "eval.json").read_text())["mc_dropout"]["seconds"] == mc["seconds"]
    row = next(
        line for line in write_report(tmp_path / "results", plots=False).splitlines() if line.startswith("| `run` |  | 3 | ")
    )  # the MC table: no paper experiment, 3 samples
    assert row.endswith(
        f"| {mc['seconds'] / 60:.1f} | {report['hardware']['cpu']}, {report['hardware']['cpu_bf16']}, {report['threads']} thr |"
    )


def test_checkpoint_of_another_vocabulary_is_refused(tiny_run: Path, tmp_path: Path):
    other = write_corpus(tmp_path / "other", seed=1)
    (other / "train.txt").write_text((other / "train.txt").read_text() + " brand new words\n")
    cfg = compose(
        "evaluate", [f"checkpoint={tiny_run / 'out' / 'checkpoint.pt'}", f"data_dir={other}", f"output={tmp_path / 'e.json'}"]
    )
    with pytest.raises(CheckpointError, match="vocabulary of .* words, the corpus"):
        run_evaluation(cfg)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None], ids=["empty", "garbage", "truncated"])
def test_corrupt_checkpoint_is_refused(tiny_run: Path, tmp_path: Path, content):
    bad = tmp_path / "checkpoint.pt"
    good = (tiny_run / "out" / "checkpoint.pt").read_bytes()
    bad.write_bytes(good[: len(good) // 2] if content is None else content)
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
        run_evaluation(compose("evaluate", [f"checkpoint={bad}"]))


def test_mixture_averages_probabilities_not_log_probabilities():
    torch.manual_seed(0)
    a, b = LanguageModel(30, 8, 1, 0.0, 0.3), LanguageModel(30, 8, 1, 0.0, 0.3)
    data = batchify(torch.randint(0, 30, (41,)), 2)
    nll, count = evaluate_mixture([a, b], data, 5)
    x, y = data[:, :-1], data[:, 1:]
    with torch.no_grad():
        pa = torch.softmax(a(x, a.init_state(2))[0], -1).gather(-1, y.unsqueeze(-1))
        pb = torch.softmax(b(x, b.init_state(2))[0], -1).gather(-1, y.unsqueeze(-1))
    assert count == y.numel()
    assert nll == pytest.approx(float(-torch.log((pa + pb) / 2).sum()), rel=1e-5)
    assert nll != pytest.approx(float(-(torch.log(pa) + torch.log(pb)).sum() / 2), rel=1e-5)
    assert evaluate_mixture([a], data, 5) == evaluate(a, data, 5)


@pytest.mark.full
def test_ensemble_command_and_report(tiny_run: Path, tmp_path: Path):
    from lm.engine.averaging import run_ensemble
    from lm.engine.training import train
    from lm.reporting.publish import write_report

    corpus = tiny_run / "corpus"
    second = tmp_path / "results" / "seed-2"
    train(train_config(tiny_overrides(corpus, "trainer.max_steps=30", "trainer.seed=2")), second)
    report = run_ensemble(
        [tiny_run / "out" / "checkpoint.pt", second / "checkpoint.pt"], tmp_path / "results" / "ensemble", data_dir=str(corpus)
    )
    members = [m["results"]["test"]["stream"]["ppl"] for m in report["members"]]
    assert report["n_models"] == 2 and report["test_ppl"] < max(members)
    assert (tmp_path / "results" / "ensemble" / "ensemble.log").exists()
    assert report["seconds"] > 0 and report["threads"] == torch.get_num_threads() and "cpu" in report["hardware"]
    text = write_report(tmp_path / "results", plots=False)
    row = next(line for line in text.splitlines() if line.startswith("| `ensemble`"))
    assert f"| {report['seconds'] / 60:.1f} | " in row and f"{report['threads']} thr |" in row  # how long, on what
    with pytest.raises(CheckpointError, match="at least 2"):
        run_ensemble([second / "checkpoint.pt"], tmp_path / "x")


def test_checkpoint_configs_from_before_new_keys_still_load(tiny_run: Path):
    """A checkpoint written before a config key existed gets today's default for it."""
    from lm.config import validate_saved
    from lm.infra.checkpoint import load_checkpoint

    saved = load_checkpoint(tiny_run / "out" / "checkpoint.pt")["config"]
    for key in ("dropout_variant", "dropout_embedding", "weight_drop", "tie_weights"):
        del saved["model"][key]
    cfg = validate_saved(saved)
    assert (cfg.model.dropout_variant, cfg.model.weight_drop, cfg.model.tie_weights) == ("zaremba", 0.0, False)
    assert cfg.model.hidden_size == 16


@pytest.mark.full
@pytest.mark.parametrize("member_tf32, expected", [((False, False), False), ((True, False), False), ((True, True), True)])
def test_model_averages_keep_the_precision_contract_and_record_it(member_tf32, expected, tiny_run: Path, tmp_path, monkeypatch):
    """lm.ensemble evaluates under the members' products: IEEE fp32 on a GPU unless every member trained
    with TF32 (PyTorch's defaults would run cuDNN's LSTM in TF32), and ensemble.json says which."""
    import lm.engine.averaging as averaging
    from lm.infra.checkpoint import load_checkpoint, save_checkpoint

    flags = []
    real = averaging.evaluate_all

    def recording(*args, **kwargs):
        flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real(*args, **kwargs)

    monkeypatch.setattr(averaging, "evaluate_all", recording)
    members = []
    for i, tf32 in enumerate(member_tf32):
        ckpt = load_checkpoint(tiny_run / "out" / "checkpoint.pt")
        ckpt["config"]["trainer"]["tf32"] = tf32
        ckpt["model"]["decoder.bias"] = ckpt["model"]["decoder.bias"] + 1e-3 * i  # distinct members (copies are refused)
        save_checkpoint(tmp_path / f"m{i}.pt", ckpt)
        members.append(tmp_path / f"m{i}.pt")
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    report = averaging.run_ensemble(members, tmp_path / "avg", data_dir=str(tiny_run / "corpus"), device="cpu")
    assert flags == [(expected, expected)] * 3  # each member alone, then the average
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert report["precision"]["tf32"] is False  # a CPU: no TF32 whatever the flags say
    assert report["precision"]["evaluation_products"] == "ieee fp32"
    assert json.loads((tmp_path / "avg" / "ensemble.json").read_text())["precision"] == report["precision"]
