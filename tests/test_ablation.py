"""The ablation table is built from real (tiny) runs, one folder per placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm.engine.training import train
from lm.reporting.ablation import ORDER, describe, write_ablation

from helpers import REPO, tiny_overrides, train_config


@pytest.mark.full
def test_table_plot_and_copies_from_one_run_per_placement(shared_tiny_corpus, tmp_path: Path):
    runs = tmp_path / "runs"
    placements = {
        "zaremba": ["model.dropout_variant=zaremba", "model.dropout=0.25"],
        "none": ["model.dropout_variant=none"],
        "unfinished": ["model.dropout_variant=none", "trainer.max_steps=2"],
    }
    for name, overrides in placements.items():
        train(train_config(tiny_overrides(shared_tiny_corpus, "trainer.epochs=2", *overrides)), runs / name)
    out = tmp_path / "results"
    text = write_ablation(runs, out)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["none", "zaremba"]  # the ablation's order; partial runs left out
    summary = json.loads((out / "ablation.json").read_text())["placements"]
    for name in ("none", "zaremba"):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        assert summary[name]["test_ppl"] == metrics["test_ppl"]
        assert summary[name]["valid_curve"] == [e["valid_ppl"] for e in metrics["epochs"]]
        assert (out / name / "metrics.json").read_bytes() == (runs / name / "metrics.json").read_bytes()
        assert f"{metrics['test_ppl']:.2f}" in rows[["none", "zaremba"].index(name)]
    assert (out / "valid_curves.png").stat().st_size > 1000
    readme = (out / "README.md").read_bytes()
    write_ablation(out, out)  # regenerating from the committed copies gives the same table
    assert (out / "README.md").read_bytes() == readme


def test_descriptions_name_every_mask():
    base = dict(
        num_layers=2,
        dropout=0.25,
        dropout_embedding=0.1,
        dropout_input=0.2,
        dropout_recurrent=0.3,
        dropout_output=0.4,
        weight_drop=0.0,
        tie_weights=False,
    )
    assert describe({**base, "dropout_variant": "none"}) == "no dropout"
    assert "3 non-recurrent connections, p=0.25" in describe({**base, "dropout_variant": "zaremba"})
    assert "h_t-1, p=0.3" in describe({**base, "dropout_variant": "recurrent"})
    text = describe({**base, "dropout_variant": "variational", "weight_drop": 0.5, "tie_weights": True})
    assert "words 0.1, layer inputs 0.2, h_t-1 0.3, output 0.4" in text and "W_hh, p=0.5" in text and "tied" in text


def test_the_table_order_names_every_placement_in_configs():
    """configs/ablation/ is the list of placements (make ablation trains every file); ORDER only orders the table."""
    assert sorted(ORDER) == sorted(p.stem for p in (REPO / "configs" / "ablation").glob("*.yaml"))
