from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lm.engine.step as step_module
from lm.config import ConfigError, compose
from lm.data.batching import bptt_windows
from lm.engine.step import learning_rate, train_epoch
from lm.engine.training import preflight, train
from lm.infra.checkpoint import RunFolderError, load_checkpoint
from lm.model.language_model import LanguageModel

from helpers import REPO, tiny_overrides, train_config

EXPERIMENTS = ["zaremba_small", "zaremba_medium", "zaremba_large", "gal_medium", "gal_large", "ablation"]
MODELS = ["tiny", "small", "medium", "large"]


# ------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "experiment, epochs_at_full_lr, decay, total",
    [("zaremba_small", 4, 1 / 2, 13), ("zaremba_medium", 6, 1 / 1.2, 39), ("zaremba_large", 14, 1 / 1.15, 55)],
)
def test_lr_schedule_of_each_recipe(experiment, epochs_at_full_lr, decay, total):
    cfg = train_config([f"experiment={experiment}"])
    assert cfg.trainer.epochs == total
    lrs = [learning_rate(e, cfg.optim) for e in range(total)]
    assert lrs[:epochs_at_full_lr] == [1.0] * epochs_at_full_lr
    assert lrs[epochs_at_full_lr] == pytest.approx(decay)
    assert lrs[-1] == pytest.approx(decay ** (total - epochs_at_full_lr))
    if experiment == "zaremba_small":  # the TF tutorial's small run ends at 0.5 ** 9
        assert lrs[-1] == pytest.approx(0.5**9)


def test_lua_convention_decays_one_epoch_later():
    cfg = train_config(["experiment=zaremba_small", "optim.decay_convention=lua"])
    assert [learning_rate(e, cfg.optim) for e in (3, 4, 5)] == [1.0, 1.0, 0.5]


# ------------------------------------------------------------- the step


def test_loss_is_summed_over_time_and_averaged_over_batch():
    torch.manual_seed(0)
    model = LanguageModel(20, 6, 2, 0.0, 0.1)
    data = torch.randint(0, 20, (3, 6))
    ((x, y),) = bptt_windows(data, 5)
    reference = LanguageModel(20, 6, 2, 0.0, 0.1)
    reference.load_state_dict(model.state_dict())
    logits, _ = reference(x, reference.init_state(3))
    loss = F.cross_entropy(logits.reshape(-1, 20), y.reshape(-1), reduction="sum") / 3
    loss.backward()
    expected = {n: p.detach() - 0.7 * p.grad for n, p in reference.named_parameters()}
    train_epoch(model, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.7), max_grad_norm=1e9)
    for n, p in model.named_parameters():
        assert torch.allclose(p, expected[n], atol=1e-6), n


def test_gradient_norm_is_clipped_globally():
    torch.manual_seed(0)
    model = LanguageModel(20, 6, 1, 0.0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = bptt_windows(torch.randint(0, 20, (3, 6)), 5)
    train_epoch(model, windows, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=0.01)
    step = torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in model.named_parameters()))
    assert step == pytest.approx(0.01, rel=1e-4)


def test_missing_detach_would_be_caught(monkeypatch):
    """train_epoch over several windows works only because the state is detached."""
    torch.manual_seed(0)
    windows = bptt_windows(torch.randint(0, 20, (2, 13)), 4)
    model = LanguageModel(20, 6, 2, 0.0, 0.1)
    train_epoch(model, windows, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=5.0)
    monkeypatch.setattr(step_module, "detach_state", lambda state: state)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        train_epoch(model, windows, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=5.0)


def test_weight_decay_shrinks_every_weight_by_its_fraction_per_step():
    torch.manual_seed(0)
    model = LanguageModel(20, 8, 1, 0.0, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randint(0, 20, (2, 3)), torch.randint(0, 20, (2, 3))
    train_epoch(model, [(x, y)], torch.optim.SGD(model.parameters(), lr=1e-12), 5.0, weight_decay=0.1)
    for b, p in zip(before, model.parameters()):
        assert torch.allclose(p, 0.9 * b, atol=1e-9)  # independent of the (here negligible) lr


def test_bf16_training_tracks_fp32_and_keeps_fp32_weights(tiny_corpus, tmp_path):
    fp32 = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=30")), tmp_path / "fp32")
    bf16 = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=30", "trainer.precision=bf16")), tmp_path / "bf16")
    assert bf16["config"]["trainer"]["precision"] == "bf16"
    assert bf16["valid_ppl"] != fp32["valid_ppl"]  # bf16 really ran
    assert abs(bf16["valid_ppl"] / fp32["valid_ppl"] - 1) < 0.02
    weights = torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 for w in weights.values())


@pytest.mark.parametrize("isa, warned", [("none", True), ("AVX512-BF16", False), ("AMX", False)])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(isa, warned, tiny_corpus, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("lm.engine.run.cpu_info", lambda: {"model": "test cpu", "bf16": isa})
    train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=2", "trainer.precision=bf16")), tmp_path / "run")
    assert any("bf16 products are emulated" in r.getMessage() for r in caplog.records) == warned


# ------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", [f"experiment={e}" for e in EXPERIMENTS] + [f"model={m}" for m in MODELS])
@pytest.mark.full
def test_every_preset_composes_and_trains_two_steps(preset, shared_tiny_corpus, tmp_path):
    overrides = tiny_overrides(shared_tiny_corpus, preset, "trainer.max_steps=2", "trainer.threads=0")
    overrides.remove("model=tiny")
    cfg = train_config(overrides)
    metrics = train(cfg, tmp_path)
    assert metrics["steps"] == 2
    assert metrics["valid_ppl"] > 1 and metrics["test_ppl"] > 1


def test_gal_large_has_the_rates_of_paper_md():
    cfg = compose("train", ["experiment=gal_large"])
    m, o = cfg.model, cfg.optim
    assert (m.dropout_variant, m.hidden_size) == ("variational", 1500)
    assert (m.dropout_embedding, m.dropout_input, m.dropout_recurrent, m.dropout_output) == (0.3, 0.5, 0.3, 0.5)
    assert (o.weight_decay, o.decay_start_epoch, o.max_grad_norm, cfg.trainer.epochs) == (1e-7, 10, 10.0, 55)


ABLATION = sorted(p.stem for p in (REPO / "configs" / "ablation").glob("*.yaml"))


def test_ablation_placements_differ_only_in_the_model_options():
    configs = {a: compose("train", ["experiment=ablation", f"ablation={a}"]) for a in ABLATION}
    base = configs["none"]
    for name, cfg in configs.items():
        for key in ("data", "optim", "trainer"):
            assert cfg[key] == base[key], (name, key)
        assert cfg.model.hidden_size == 200 and cfg.model.name == "small"
    assert len({str(cfg.model) for cfg in configs.values()}) == len(ABLATION)  # each a different placement
    assert configs["recurrent"].model.dropout_recurrent > 0 and configs["variational_wd"].model.weight_drop > 0


def test_max_steps_run_writes_complete_metrics(tiny_corpus, tmp_path):
    cfg = train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=3", "trainer.epochs=2"))
    train(cfg, tmp_path, overrides=["trainer.max_steps=3"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("valid_ppl", "test_ppl", "test_protocol", "epochs", "config", "seed", "torch_version", "git_commit"):
        assert key in metrics
    assert metrics["steps"] == 3 and len(metrics["epochs"]) == 1
    assert set(metrics["epochs"][0]) >= {"epoch", "lr", "train_ppl", "valid_ppl", "words_per_s", "seconds"}
    assert metrics["test_protocol"] == "stream"
    assert metrics["config"]["model"]["hidden_size"] == 16
    assert (tmp_path / "checkpoint.pt").exists() and any((tmp_path / "tb").iterdir())


@pytest.mark.full
def test_resume_is_bit_identical(tiny_corpus, tmp_path):
    straight = train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=3")), tmp_path / "a")
    train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=1")), tmp_path / "b")
    resumed = train(train_config(tiny_overrides(tiny_corpus, "trainer.epochs=3", "trainer.resume=auto")), tmp_path / "b")
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["train_ppl"] for e in straight["epochs"]] == [e["train_ppl"] for e in resumed["epochs"]]
    assert straight["test_ppl"] == resumed["test_ppl"]


def test_same_seed_same_numbers_on_cpu(tiny_corpus, tmp_path):
    first = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=20")), tmp_path / "a")
    second = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=20")), tmp_path / "b")
    other = train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=20", "trainer.seed=2")), tmp_path / "c")
    assert first["valid_ppl"] == second["valid_ppl"] and first["test_ppl"] == second["test_ppl"]
    assert other["valid_ppl"] != first["valid_ppl"]


def test_resume_refuses_a_checkpoint_of_another_model(tiny_corpus, tmp_path):
    train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=1")), tmp_path)
    from lm.infra.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="another model .*hidden_size 16, this run 32"):
        train(train_config(tiny_overrides(tiny_corpus, "model.hidden_size=32", "trainer.resume=auto")), tmp_path)


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dropout=1.5", r"model.dropout must be in \[0, 1\), got 1.5"),
        ("model.dropout=-0.1", r"model.dropout must be in \[0, 1\)"),
        ("model.hidden_size=0", "model.hidden_size must be a positive integer"),
        ("model.hidden_size=abc", "model.hidden_size"),
        ("model.num_layers=-2", "model.num_layers must be a positive integer"),
        ("model.init_scale=0", "model.init_scale"),
        ("data.batch_size=0", "data.batch_size must be a positive integer"),
        ("data.bptt=-1", "data.bptt must be a positive integer"),
        ("optim.lr=-1", "optim.lr must be a positive number"),
        ("optim.lr_decay=1.2", r"optim.lr_decay must be in \(0, 1\]"),
        ("optim.decay_convention=torch", "optim.decay_convention must be one of"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm"),
        ("trainer.epochs=0", "trainer.epochs must be a positive integer"),
        ("trainer.max_steps=0", "trainer.max_steps must be null or a positive integer"),
        ("trainer.device=tpu", "trainer.device must be cpu, cuda or auto"),
        ("trainer.seed=1.5", "trainer.seed"),
    ],
)
def test_bad_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        preflight(compose("train", [override], return_hydra_config=True))


def _run_cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "HYDRA_FULL_ERROR")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.dropout=1.5"], "model.dropout must be in [0, 1), got 1.5"),
        (["model.foo=1"], "Key 'foo' is not in struct"),
        (["model=huge"], "Could not find 'model/huge'"),
        (["data.dir=nowhere", "data.download=false"], "nowhere/ptb.train.txt is missing"),
    ],
    ids=["range", "unknown-key", "unknown-preset", "missing-data"],
)
@pytest.mark.full
def test_cli_user_errors_are_one_line_exit_2_and_write_nothing(args, message, tmp_path):
    run_dir = tmp_path / "run"
    result = _run_cli(["lm.train", *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    if "data" not in args[0]:
        assert not run_dir.exists()


def test_finished_run_is_not_overwritten(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(train_config(tiny_overrides(tiny_corpus, "trainer.max_steps=1")), run_dir)
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(RunFolderError, match="already holds a finished run: pass trainer.resume=auto"):
        preflight(compose("train", tiny_overrides(tiny_corpus, f"hydra.run.dir={run_dir}"), return_hydra_config=True))
    assert (run_dir / "metrics.json").read_bytes() == before
    preflight(
        compose(
            "train", tiny_overrides(tiny_corpus, f"hydra.run.dir={run_dir}", "trainer.overwrite=true"), return_hydra_config=True
        )
    )


def test_only_rank_0_refuses_a_locked_folder_before_training(tiny_corpus, tmp_path, monkeypatch):
    """Under torchrun, rank 0 may already hold the run's lock when another rank's preflight runs:
    that rank must not take it for another run (the lock is rank 0's, one per run)."""
    from lm.infra.checkpoint import RunFolderLock

    cfg = compose("train", tiny_overrides(tiny_corpus, f"hydra.run.dir={tmp_path / 'run'}"), return_hydra_config=True)
    with RunFolderLock(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="in use by another run"):
            preflight(cfg)
        monkeypatch.setenv("RANK", "1")
        preflight(cfg)


@pytest.mark.full
def test_cli_trains_end_to_end(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = _run_cli(["lm.train", *tiny_overrides(tiny_corpus, "trainer.max_steps=4"), f"hydra.run.dir={run_dir}"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "trainer.max_steps=4" in metrics["overrides"]
    assert "valid ppl" in (run_dir / "train.log").read_text()


# ------------------------------------------------------------- real PTB


@pytest.mark.ptb
@pytest.mark.slow
def test_small_model_learns_ptb_in_200_steps(ptb_dir, tmp_path):
    cfg = train_config(
        [
            "experiment=zaremba_small",
            f"data.dir={ptb_dir}",
            "trainer.max_steps=200",
            "trainer.progress=false",
            "trainer.device=cpu",
        ]
    )
    metrics = train(cfg, tmp_path)
    assert metrics["parameters"] == 4_653_200
    assert metrics["test_predictions"] == 82_429
    assert metrics["valid_ppl"] < 1000  # a uniform guess is 10,000
    assert metrics["test_ppl"] < 1000
