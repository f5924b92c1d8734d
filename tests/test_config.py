"""Config precedence is what configs/train.yaml says, and keys that would do nothing are refused or warned about."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from lm.config import (
    CONFIG_DIR,
    PRESET_GROUPS,
    ConfigError,
    TrainConfig,
    check_group_choices,
    compose,
    ignored_overrides,
    recipe,
    validate,
)
from lm.engine.training import preflight, train

from helpers import REPO, tiny_overrides, train_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# ------------------------------------------------------------- precedence


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_no_experiment_sets_a_key_that_a_group_preset_sets(experiment):
    """So that a preset chosen on the command line is never silently overridden by the experiment."""
    for group in PRESET_GROUPS:
        for preset in presets(group):
            check_group_choices([f"{group}={preset}"], {"experiment": experiment, group: preset})


@pytest.mark.parametrize(
    "experiment, optim", [("zaremba_small", "zaremba_medium"), ("zaremba_medium", "sgd"), ("gal_large", "ablation")]
)
def test_an_optim_preset_on_the_command_line_wins_over_the_experiment(experiment, optim):
    cfg = compose("train", [f"experiment={experiment}", f"optim={optim}"])
    assert cfg.optim == compose("train", [f"optim={optim}"]).optim
    assert cfg.name == experiment and cfg.trainer.epochs == compose("train", [f"experiment={experiment}"]).trainer.epochs


def test_a_data_preset_on_the_command_line_keeps_the_recipes_batching():
    """A data preset names a corpus; the batch size and BPTT length are the recipe's own keys."""
    cfg = compose("train", ["experiment=zaremba_medium", "data=custom", "data.dir=/corpus"])
    assert (cfg.data.name, cfg.data.dir, cfg.data.batch_size, cfg.data.bptt) == ("custom", "/corpus", 20, 35)


def test_trainer_smoke_with_an_experiment_is_a_few_steps_of_that_recipe():
    cfg = compose("train", ["experiment=zaremba_medium", "trainer=smoke"])
    assert (cfg.trainer.max_steps, cfg.trainer.progress, cfg.trainer.epochs) == (5, False, 39)


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, folder)
    return folder


def test_a_preset_that_the_experiment_restates_is_refused_in_one_line(config_copy):
    (config_copy / "experiment" / "restating.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: small\noptim:\n  lr: 0.5\n"
    )
    with pytest.raises(ConfigError, match=r"^optim=sgd: experiment=restating sets optim.lr too and would silently win"):
        check_group_choices(["experiment=restating", "optim=sgd"], {"experiment": "restating", "optim": "sgd"}, config_copy)
    with pytest.raises(ConfigError, match=r"^optim=gal_medium: experiment=restating sets optim.lr too"):  # inherited from sgd
        check_group_choices(["optim=gal_medium"], {"experiment": "restating", "optim": "gal_medium"}, config_copy)
    check_group_choices(["experiment=restating"], {"experiment": "restating", "optim": "sgd"}, config_copy)  # not chosen


def test_the_command_line_refusal_runs_before_anything_is_written(tmp_path, monkeypatch):
    import lm.engine.training

    def refuse(overrides, choices):
        assert "optim=sgd" in overrides and choices["experiment"] == "zaremba_small"
        raise ConfigError("refused")

    monkeypatch.setattr(lm.engine.training, "check_group_choices", refuse)
    with pytest.raises(ConfigError, match="refused"):
        preflight(
            compose(
                "train", ["experiment=zaremba_small", "optim=sgd", f"hydra.run.dir={tmp_path / 'run'}"], return_hydra_config=True
            )
        )
    assert not (tmp_path / "run").exists()


def test_a_model_preset_may_set_the_dropout_keys(config_copy):
    """train.yaml's dropout defaults come first (_self_), so a model preset can change them."""
    (config_copy / "model" / "small_variational.yaml").write_text(
        "defaults:\n  - small\n  - _self_\nname: small_variational\ndropout_variant: variational\ndropout_input: 0.3\n"
    )
    with initialize_config_dir(config_dir=str(config_copy), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["model=small_variational"])
    assert (cfg.model.dropout_variant, cfg.model.dropout_input, cfg.model.hidden_size) == ("variational", 0.3, 200)


# ------------------------------------------------------------- keys without effect


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["experiment=zaremba_medium", "model.dropout_variant=variational"],
            "model.dropout=0.5 has no effect with model.dropout_variant=variational, whose own rates",
        ),
        (["model.dropout_input=0.3"], "model.dropout_input=0.3 has no effect with model.dropout_variant=zaremba"),
        (["model.dropout_variant=recurrent", "model.dropout_output=0.2"], "model.dropout_output=0.2 has no effect"),
    ],
)
def test_dropout_that_would_land_nowhere_is_refused_in_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        preflight(compose("train", [*overrides, f"hydra.run.dir={tmp_path}"], return_hydra_config=True))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=gal_medium"],  # model.dropout (0.5, the medium preset's) is ignored, the variational rates are set
        ["experiment=zaremba_medium", "model.dropout_variant=none"],  # no dropout, asked for by name
        ["experiment=zaremba_medium", "model.dropout_variant=variational", "model.dropout_input=0.35"],
    ],
)
def test_a_variant_with_its_own_rates_is_accepted(overrides):
    validate(compose("train", overrides))


def test_a_rate_set_on_the_command_line_that_the_variant_ignores_is_warned_about(shared_tiny_corpus, tmp_path, caplog):
    overrides = tiny_overrides(
        shared_tiny_corpus,
        "model.dropout_variant=variational",
        "model.dropout_input=0.2",
        "model.dropout=0.3",
        "trainer.max_steps=1",
    )
    cfg = train_config(overrides)
    assert ignored_overrides(cfg, overrides) == ["model.dropout"]
    assert ignored_overrides(cfg, ["model.dropout_input=0.2"]) == []  # read by the variant
    with caplog.at_level(logging.WARNING, logger="lm.train"):
        train(cfg, tmp_path, overrides)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["model.dropout has no effect with model.dropout_variant=variational: see configs/train.yaml"]


# ------------------------------------------------------------- recipes


@pytest.mark.full
def test_a_recipe_is_what_a_run_measures_not_how_it_ran():
    small = recipe(validate(compose("train", ["experiment=zaremba_small"])))
    how = ["trainer.seed=3", "trainer.threads=1", "trainer.precision=bf16", "data.dir=/x", "name=mine", "trainer.log_every=7"]
    assert recipe(validate(compose("train", ["experiment=zaremba_small", *how]))) == small
    for what in ["data.bptt=35", "trainer.epochs=2", "optim.lr=0.5", "model.tie_weights=true", "data=custom"]:
        assert recipe(validate(compose("train", ["experiment=zaremba_small", what, "data.dir=/x"]))) != small, what
    gal = recipe(validate(compose("train", ["experiment=gal_medium"])))
    assert recipe(validate(compose("train", ["experiment=gal_medium", "model.dropout=0.0"]))) == gal  # ignored by the variant


def test_the_readme_config_table_lists_every_key_and_preset(config_copy):
    """Generated from the schema and configs/: a key or a preset file added shows up in the table,
    and the README holds the table as generated (make table writes it)."""
    from lm.reporting.config_keys import config_keys_table, keys
    from lm.reporting.publish import CONFIG_KEYS_END, CONFIG_KEYS_START

    table = config_keys_table(config_copy)
    rows = {row.split(" | ")[0].strip("| ").split(":")[0].strip("`"): row for row in table.splitlines()[2:]}
    for group in ("model", "data", "optim", "trainer"):
        listed = rows[group].rsplit(" | ", 1)[1]
        assert all(f"`{key.split('.', 1)[1]}`" in listed for key in keys(TrainConfig) if key.startswith(group + "."))
        assert all(f"`{p.stem}`" in rows[group] for p in (config_copy / group).glob("*.yaml"))
    assert "`eval.mc_samples`" in rows["python -m lm.evaluate"]
    (config_copy / "optim" / "adamish.yaml").write_text("lr: 0.1\n")
    assert "`adamish`" in config_keys_table(config_copy) and "`adamish`" not in table
    readme = (REPO / "README.md").read_text()
    assert f"{CONFIG_KEYS_START}\n{config_keys_table()}\n{CONFIG_KEYS_END}" in readme, "run make table"
