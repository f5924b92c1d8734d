"""The cell component (lm.model.cells): every cell computes its library layer's function in its own
time loop (the fused CPU kernel, the plain PyTorch loop, the compiled step), takes the mask on
h_{t-1} where its docstring says, works under every dropout strategy and precision, trains,
evaluates, averages and generates end to end, and checkpoints refuse another cell's weights."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lm import config, kernels
from lm.config import compose
from lm.engine.averaging import run_ensemble
from lm.engine.evaluation import evaluate, evaluate_mc, run_evaluation
from lm.engine.generation import run_generation
from lm.engine.runtime import build_model_from_checkpoint
from lm.engine.training import train
from lm.infra.checkpoint import CheckpointError, load_checkpoint
from lm.model.cells import CELLS, cell_of_weights
from lm.model.cells.gru import GRULayer, gru_step
from lm.model.cells.loop import CompiledWindow, window_loop
from lm.model.cells.state import detach_state, flatten_state, unflatten_state
from lm.model.language_model import LanguageModel

from helpers import REPO, tiny_overrides, train_config

B, T, H = 3, 6, 5


def _outputs_and_gradients(fn, layer, x, state):
    """Outputs, final state and the gradient of the input, state and every parameter for a fixed loss."""
    for p in [x, *state, *layer.parameters()]:
        p.grad = None
    out, new_state = fn()
    loss = out.sin().sum() + sum((k + 1) * 0.3 * s.cos().sum() for k, s in enumerate(new_state))
    loss.backward()
    return [out.detach(), *(s.detach() for s in new_state)] + [p.grad.clone() for p in [x, *state, *layer.parameters()]]


def _problem(cell: str, steps: int = T):
    torch.manual_seed(0)
    layer = CELLS[cell](H, H)
    x = torch.randn(B, steps, H, requires_grad=True)
    state = tuple(torch.randn(1, B, H, requires_grad=True) for _ in layer.state_names)
    return layer, x, state


def reference_gru(layer, x, state, h_masks):
    """nn.GRU's equations step by step, h_masks[t] on h_{t-1} where it enters the recurrent products
    only (before the reset product), the interpolation on the unmasked h_{t-1}."""
    h = state[0][0]
    w_ir, w_iz, w_in = layer.weight_ih_l0.chunk(3)
    w_hr, w_hz, w_hn = layer.weight_hh_l0.chunk(3)
    b_ir, b_iz, b_in = layer.bias_ih_l0.chunk(3)
    b_hr, b_hz, b_hn = layer.bias_hh_l0.chunk(3)
    lin = torch.nn.functional.linear
    outputs = []
    for t in range(x.size(1)):
        h_in = h * h_masks[t]
        r = torch.sigmoid(lin(x[:, t], w_ir, b_ir) + lin(h_in, w_hr, b_hr))
        z = torch.sigmoid(lin(x[:, t], w_iz, b_iz) + lin(h_in, w_hz, b_hz))
        n = torch.tanh(lin(x[:, t], w_in, b_in) + r * lin(h_in, w_hn, b_hn))
        h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs, 1), (h.unsqueeze(0),)


def _masks(kind: str, steps: int = T):
    g = torch.Generator().manual_seed(1)
    if kind == "shared":
        m = (torch.rand(B, H, generator=g) > 0.3) / 0.7
        return m, [m] * steps
    m = (torch.rand(steps, B, H, generator=g) > 0.3) / 0.7
    return m, list(m)


# ------------------------------------------------------------- the component


def test_the_config_names_every_cell_and_only_them():
    assert config.CELLS == tuple(CELLS)
    for name, cell in CELLS.items():
        assert cell.name == name and cell.state_names[0] == "h"


def test_nothing_outside_the_cells_folder_imports_a_particular_cell():
    """Adding a cell touches lm/model/cells/, its config and its tests: the rest of the code reaches
    cells through the registry and the state functions only."""
    allowed = {"lm.model.cells", "lm.model.cells.state"}
    for path in (REPO / "lm").rglob("*.py"):
        if "cells" in path.relative_to(REPO / "lm").parts:
            continue
        for module in re.findall(r"^\s*from (lm\.model\.cells[\w.]*) import", path.read_text(), re.M):
            assert module in allowed, f"{path.relative_to(REPO)} imports {module}"
        assert not re.search(r"\bnn\.(LSTM|GRU)\(", path.read_text()), f"{path.relative_to(REPO)} builds a library layer itself"


@pytest.mark.parametrize("cell", list(CELLS))
def test_state_has_the_cells_tensors_and_the_engine_only_maps_over_them(cell):
    model = LanguageModel(20, H, 2, 0.0, 0.1, cell=cell)
    state = model.init_state(B)
    assert [len(layer) for layer in state] == [len(CELLS[cell].state_names)] * 2
    assert all(t.shape == (1, B, H) and not t.any() for layer in state for t in layer)
    _, new_state = model(torch.randint(0, 20, (B, 4)), state)
    flat, layout = flatten_state(detach_state(new_state))
    rebuilt = unflatten_state(flat, layout)
    assert all(torch.equal(a, b) for la, lb in zip(new_state, rebuilt) for a, b in zip(la, lb))


@pytest.mark.parametrize("cell", list(CELLS))
def test_the_own_loop_computes_the_library_layer(cell, backend):
    """Without a mask the cell's own loop is nn.LSTM's / nn.GRU's function: values and every gradient."""
    for steps in (T, 1):
        layer, x, state = _problem(cell, steps)
        expected = _outputs_and_gradients(lambda layer=layer, x=x, state=state: layer(x, state), layer, x, state)
        got = _outputs_and_gradients(lambda layer=layer, x=x, state=state: layer.window(x, state), layer, x, state)
        for a, b in zip(expected, got):
            assert torch.allclose(a, b, atol=1e-5), (cell, backend, steps)


@pytest.mark.parametrize("kind", ["shared", "per_step"])
def test_the_gru_mask_on_h_enters_the_products_not_the_carried_state(kind, backend):
    layer, x, state = _problem("gru")
    mask, per_step = _masks(kind)
    expected = _outputs_and_gradients(lambda: reference_gru(layer, x, state, per_step), layer, x, state)
    got = _outputs_and_gradients(lambda: layer.window(x, state, h_mask=mask), layer, x, state)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-5)
    # the other placement (a mask on the carried h_{t-1} too) is another function
    carried = [torch.ones(B, H)] * T
    everywhere = reference_gru(layer, x, state, carried)[0]
    assert not torch.allclose(got[0], everywhere, atol=1e-3)


@pytest.mark.parametrize("cell", list(CELLS))
def test_bf16_products_track_fp32_with_fp32_state(cell, backend):
    layer, x, state = _problem(cell)
    mask, _ = _masks("per_step")
    exact = _outputs_and_gradients(lambda: layer.window(x, state, h_mask=mask), layer, x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, new_state = layer.window(x, state, h_mask=mask)
    assert out.dtype == torch.float32 and all(s.dtype == torch.float32 for s in new_state)
    assert torch.allclose(out, exact[0], atol=3e-2) and not torch.equal(out, exact[0])


def test_the_gru_kernel_and_the_plain_loop_agree_with_masks_and_bf16(monkeypatch):
    if kernels.fused() is None:
        pytest.skip("no compiler here")
    layer, x, state = _problem("gru")
    mask, _ = _masks("per_step")
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fused = _outputs_and_gradients(lambda: layer.window(x, state, h_mask=mask), layer, x, state)
            with monkeypatch.context() as m:
                m.setattr(kernels, "available", lambda device: False)
                plain = _outputs_and_gradients(lambda: layer.window(x, state, h_mask=mask), layer, x, state)
        for a, b in zip(fused, plain):  # bf16: within 2% of each tensor's largest value
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * float(a.abs().max())
            assert float((a.float() - b.float()).abs().max()) <= tolerance


def _counting_compile(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return lambda fn, **options: torch.compile(fn, backend=backend, **options)


def _gru_inputs(layer, x, dtype=torch.float32):
    hidden = layer.hidden_size
    b_hh = layer.bias_hh_l0
    x_bias = layer.bias_ih_l0 + torch.cat([b_hh[: 2 * hidden], torch.zeros(hidden)])
    x_proj = torch.nn.functional.linear(x, layer.weight_ih_l0, x_bias).transpose(0, 1)
    return x_proj, (layer.weight_hh_l0.to(dtype).t(), b_hh[2 * hidden :])


@pytest.mark.full
def test_one_compiled_gru_step_serves_windows_of_every_length():
    """As the LSTM's: the step is compiled, not the window; two graphs (first step, the others)."""
    torch._dynamo.reset()
    graphs: list = []
    compiled = CompiledWindow(gru_step, "GRU", _counting_compile(graphs))
    layer, _, _ = _problem("gru")
    for steps in (7, 3, 1, 12):
        x = torch.randn(B, steps, H)
        x_proj, params = _gru_inputs(layer, x)
        h0 = torch.zeros(B, H)
        out, (h,) = compiled(x_proj, (h0,), params, None, torch.float32)
        expected, (h_expected,) = window_loop(gru_step, x_proj, (h0,), params, None, torch.float32)
        assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(h, h_expected, atol=1e-6)
        out.sum().backward()
    assert len(graphs) == 2 and compiled.status()["windows_compiled"] == 4


@pytest.mark.full
def test_the_compiled_gru_step_through_aot_autograd_matches_nn_gru_and_the_mask_reference():
    torch._dynamo.reset()
    compiled = CompiledWindow(gru_step, "GRU", lambda fn, **options: torch.compile(fn, backend="aot_eager", **options))
    layer, x, state = _problem("gru")
    mask, per_step = _masks("per_step")

    def run_compiled(h_mask):
        x_proj, params = _gru_inputs(layer, x)
        out, (h,) = compiled(x_proj, (state[0][0],), params, h_mask, torch.float32)
        return out.transpose(0, 1), (h.unsqueeze(0),)

    for h_mask, reference in ((None, lambda: layer(x, state)), (mask, lambda: reference_gru(layer, x, state, per_step))):
        expected = _outputs_and_gradients(reference, layer, x, state)
        got = _outputs_and_gradients(lambda h_mask=h_mask: run_compiled(h_mask), layer, x, state)
        for a, b in zip(expected, got):
            assert torch.allclose(a, b, atol=1e-5)
    assert not compiled.failed


def test_a_failed_gru_compile_names_the_gru():
    def broken(fn, **options):
        def run(*args):
            raise RuntimeError("no triton")

        return run

    layer, x, _ = _problem("gru")
    x_proj, params = _gru_inputs(layer, x)
    compiled = CompiledWindow(gru_step, "GRU", broken)
    assert compiled(x_proj, (torch.zeros(B, H),), params, None, torch.float32) is None
    assert compiled.status()["fallback_reason"] == "no triton"


# ------------------------------------------------------------- the model with every option

OPTIONS = {
    "zaremba": dict(variant="zaremba"),
    "variational": dict(
        variant="variational", dropout_embedding=0.1, dropout_input=0.2, dropout_recurrent=0.3, dropout_output=0.25
    ),
    "recurrent": dict(variant="recurrent", dropout_recurrent=0.3),
    "none": dict(variant="none"),
    "weight drop, tied": dict(variant="zaremba", weight_drop=0.3, tie_weights=True),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_a_gru_model_trains_under_every_strategy_and_precision(option, precision):
    torch.manual_seed(0)
    model = LanguageModel(30, 8, 2, 0.4, 0.1, cell="gru", **OPTIONS[option]).train()
    x = torch.randint(0, 30, (4, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits, state = model(x, model.init_state(4))
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert [len(layer) for layer in state] == [1, 1]
    model.eval()
    with torch.no_grad():
        a, _ = model(x, model.init_state(4))
        b, _ = model(x, model.init_state(4))
    assert torch.equal(a, b)  # no mask at evaluation


# ------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def gru_runs(tmp_path_factory, shared_tiny_corpus):
    root = tmp_path_factory.mktemp("gru")
    extra = ["model.cell=gru", "model.dropout_variant=variational", "model.dropout_recurrent=0.2", "model.dropout_input=0.2"]
    for seed in (1, 2):
        train(
            train_config(tiny_overrides(shared_tiny_corpus, "trainer.max_steps=20", f"trainer.seed={seed}", *extra)),
            root / f"s{seed}",
        )
    return root, shared_tiny_corpus


@pytest.mark.full
def test_a_gru_run_evaluates_averages_and_generates(gru_runs, tmp_path):
    root, corpus = gru_runs
    metrics = json.loads((root / "s1" / "metrics.json").read_text())
    assert metrics["config"]["model"]["cell"] == "gru"
    report = run_evaluation(
        compose(
            "evaluate", [f"checkpoint={root / 's1' / 'checkpoint.pt'}", f"data_dir={corpus}", "device=cpu", "eval.mc_samples=3"]
        )
    )
    assert report["results"]["test"]["stream"]["ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-9)
    assert report["results"]["valid"]["batched"]["ppl"] == pytest.approx(metrics["valid_ppl"], rel=1e-9)
    mc = report["mc_dropout"]["results"]["test"]["stream"]["ppl"]
    assert mc != report["results"]["test"]["stream"]["ppl"] and mc < 1e4
    ensemble = run_ensemble(
        [root / "s1" / "checkpoint.pt", root / "s2" / "checkpoint.pt"], tmp_path / "ens", data_dir=str(corpus)
    )
    assert ensemble["n_models"] == 2
    words = run_generation(compose("generate", [f"checkpoint={root / 's1' / 'checkpoint.pt'}", "words=12", "prompt=the"]))
    assert len(words.split()) >= 12


@pytest.mark.full
def test_a_checkpoint_of_another_cell_is_refused_in_one_line(gru_runs):
    root, corpus = gru_runs
    ckpt = load_checkpoint(root / "s1" / "checkpoint.pt")
    assert cell_of_weights(ckpt["model"], 16) == "gru"
    assert isinstance(build_model_from_checkpoint(ckpt, len(ckpt["vocab"])).layers[0], GRULayer)
    ckpt["config"]["model"]["cell"] = "lstm"
    with pytest.raises(CheckpointError, match=r"^checkpoint's weights are a GRU's but its config says model.cell=lstm: [^\n]*$"):
        build_model_from_checkpoint(ckpt, len(ckpt["vocab"]))


@pytest.mark.full
def test_resuming_with_another_cell_is_refused(gru_runs, tmp_path):
    root, corpus = gru_runs
    run = tmp_path / "run"
    train(train_config(tiny_overrides(corpus, "trainer.max_steps=2", "model.cell=gru")), run)
    with pytest.raises(CheckpointError, match="model.cell"):
        train(train_config(tiny_overrides(corpus, "trainer.max_steps=4", "trainer.resume=auto")), run)


@pytest.mark.full
def test_a_gru_resume_is_bit_identical(shared_tiny_corpus, tmp_path):
    gru = ("model.cell=gru", "model.dropout_variant=recurrent", "model.dropout_recurrent=0.2")
    straight = train(train_config(tiny_overrides(shared_tiny_corpus, "trainer.epochs=2", *gru)), tmp_path / "a")
    train(train_config(tiny_overrides(shared_tiny_corpus, "trainer.epochs=1", *gru)), tmp_path / "b")
    resumed = train(
        train_config(tiny_overrides(shared_tiny_corpus, "trainer.epochs=2", "trainer.resume=auto", *gru)), tmp_path / "b"
    )
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["test_ppl"] == resumed["test_ppl"]


def test_evaluation_and_mc_run_a_gru_model():
    torch.manual_seed(0)
    model = LanguageModel(30, 8, 2, 0.0, 0.1, cell="gru", variant="variational", dropout_recurrent=0.3)
    data = torch.randint(0, 30, (2, 40))
    nll, count = evaluate(model, data, 7)
    assert count == 2 * 39 and nll > 0
    mc, _ = evaluate_mc(model, data, 7, samples=3)
    assert mc != nll
