from __future__ import annotations

import pytest
import torch
from torch import nn

from lm.config import compose, validate
from lm.model.cells.state import detach_state
from lm.model.language_model import LanguageModel, count_parameters
from lm.reporting.paper import PAPER_PARAMETERS


def make(hidden=8, layers=2, dropout=0.5, init=0.1, vocab=30) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(vocab, hidden, layers, dropout, init)


@pytest.mark.parametrize("size", sorted(PAPER_PARAMETERS))
@pytest.mark.full
def test_parameter_counts_match_the_paper(size):
    """Each model preset, as the configs define it, has the paper's parameter count."""
    cfg = validate(compose("train", [f"model={size}"])).model
    model = LanguageModel.from_config(cfg, 10_000)
    assert count_parameters(model) == PAPER_PARAMETERS[size]


def test_every_parameter_uniform_in_init_range_biases_too():
    model = make(hidden=64, init=0.05)
    for name, p in model.named_parameters():
        assert p.abs().max() <= 0.05, name
        assert p.abs().max() > 0.04, name  # really spread over the range, not left at a default
        if "bias" in name:
            assert p.std() > 0.02, name


def test_shapes_and_state():
    model = make()
    x = torch.randint(0, 30, (3, 7))
    logits, state = model(x, model.init_state(3))
    assert logits.shape == (3, 7, 30)
    assert len(state) == 2 and state[0][0].shape == (1, 3, 8)


def test_dropout_never_touches_the_recurrent_path():
    """Re-running each layer without dropout on the (already masked) input it saw must
    give exactly its output: any mask on h_{t-1} -> h_t or on c would break this."""
    model = make(dropout=0.5).train()
    seen = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, i=i: seen.append((i, args[0].detach(), args[1], out[0].detach())))
        for i, layer in enumerate(model.layers)
    ]
    model(torch.randint(0, 30, (4, 9)), model.init_state(4))
    for h in hooks:
        h.remove()
    assert [i for i, *_ in seen] == [0, 1]
    for i, layer_input, layer_state, layer_output in seen:
        replay, _ = model.layers[i](layer_input, layer_state)
        assert torch.equal(replay, layer_output), f"layer {i} output differs: a mask reached the recurrence"


def test_dropout_never_touches_the_recurrent_path_in_bf16_training(monkeypatch):
    """bf16 training on CPU runs the layers through the cell's own loop: it is handed no mask,
    and replaying it without dropout gives exactly the output it produced."""
    from helpers import record_layer_calls

    model = make(dropout=0.5).train()
    calls = record_layer_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 30, (4, 9)), model.init_state(4))
        assert len(calls) == 2
        for layer, layer_input, layer_state, h_mask, layer_output in list(calls):  # (replays are recorded too)
            assert h_mask is None
            assert torch.equal(layer.window(layer_input, layer_state)[0], layer_output)


def test_replay_check_detects_recurrent_dropout():
    """The check above can fail: an LSTM with a mask on h_{t-1} does not replay."""
    model = make(dropout=0.5).train()
    layer = model.layers[0]
    x = torch.randn(4, 9, 8)
    state = (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))
    outputs, hc = [], state
    for t in range(9):  # a "wrong" placement: fresh mask on h_{t-1} at every step
        h = nn.functional.dropout(hc[0], 0.5, training=True)
        out, hc = layer(x[:, t : t + 1], (h, hc[1]))
        outputs.append(out)
    assert not torch.allclose(torch.cat(outputs, 1), layer(x, state)[0], atol=1e-6)


def test_dropout_in_exactly_l_plus_one_places_with_fresh_masks():
    model = make(dropout=0.5, layers=3).train()
    calls = []
    for i, drop in enumerate(model.drops):
        drop.register_forward_hook(lambda mod, args, out, i=i: calls.append((i, args[0], out)))
    model(torch.randint(0, 30, (2, 6)), model.init_state(2))
    assert [i for i, _, _ in calls] == [0, 1, 2, 3]  # embedding output, after each of the 3 layers
    for _, inp, out in calls:
        kept = out != 0
        assert 0.2 < kept.float().mean() < 0.8  # about half dropped
        assert torch.allclose(out[kept], inp[kept] * 2.0)  # inverted dropout: scaled at training time
        # a fresh mask at every time step: the masks of different steps differ
        masks = kept.transpose(0, 1).reshape(6, -1)
        assert len({tuple(m.tolist()) for m in masks}) > 1


def test_eval_mode_is_deterministic_and_mask_free():
    model = make(dropout=0.5).eval()
    x = torch.randint(0, 30, (2, 5))
    a, _ = model(x, model.init_state(2))
    b, _ = model(x, model.init_state(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dropout, draws", [(0.0, False), (0.5, True)])
def test_no_dropout_placement_when_rate_is_zero(dropout, draws):
    """At rate 0 a training pass draws no mask (the generator is untouched) and computes what
    evaluation does; at 0.5 it draws, so the check can tell the two apart."""
    model = make(dropout=dropout).train()
    x = torch.randint(0, 30, (2, 5))
    before = torch.get_rng_state()
    trained_path = model(x, model.init_state(2))[0]
    assert torch.equal(torch.get_rng_state(), before) != draws
    same = torch.allclose(trained_path, model.eval()(x, model.init_state(2))[0], atol=1e-6)
    assert same != draws


def test_detach_cuts_the_graph_between_windows():
    model = make(dropout=0.0)
    h0 = [(torch.zeros(1, 2, 8, requires_grad=True), torch.zeros(1, 2, 8, requires_grad=True)) for _ in range(2)]
    _, state = model(torch.randint(0, 30, (2, 4)), h0)
    out, _ = model(torch.randint(0, 30, (2, 4)), detach_state(state))
    out.sum().backward()
    assert all(h.grad is None and c.grad is None for h, c in h0)
    _, state = model(torch.randint(0, 30, (2, 4)), h0)  # without the detach, gradient flows back
    out, _ = model(torch.randint(0, 30, (2, 4)), state)
    out.sum().backward()
    assert h0[0][0].grad is not None


VARIANT_OPTIONS = {  # every dropout variant and option, with the masks that both backends draw alike
    "zaremba": dict(variant="zaremba"),
    "variational": dict(
        variant="variational", dropout_embedding=0.2, dropout_input=0.3, dropout_recurrent=0.3, dropout_output=0.3
    ),
    "recurrent": dict(variant="recurrent", dropout_recurrent=0.3),
    "weight drop": dict(variant="zaremba", weight_drop=0.3),
    "tied": dict(variant="zaremba", tie_weights=True),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(VARIANT_OPTIONS))
def test_every_variant_trains_alike_on_the_fused_kernels_and_the_fallback(monkeypatch, name, precision):
    """One training step's loss and gradients, compiled kernels against the pure-PyTorch path, for
    every variant and option in fp32 and bf16 (fresh dropout 0: the two backends draw those masks
    differently by design; every other mask comes from torch's generator in both)."""
    from lm import kernels
    from lm.model.loss import summed_nll

    if kernels.fused() is None:
        pytest.skip("no compiler here")

    def step(available: bool):
        monkeypatch.setattr(kernels, "available", lambda device: available)
        torch.manual_seed(0)
        model = LanguageModel(30, 16, 2, 0.0, 0.1, **VARIANT_OPTIONS[name])
        x, y = torch.randint(0, 30, (4, 9)), torch.randint(0, 30, (4, 9))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden, _ = model.features(x, model.init_state(4))
            loss = summed_nll(model.decoder, hidden, y)
        (loss / 4).backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    fused_loss, fused_grads = step(True)
    fallback_loss, fallback_grads = step(False)
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    assert torch.allclose(fused_loss, fallback_loss, **tol)
    for n in fused_grads:
        assert torch.allclose(fused_grads[n], fallback_grads[n], **tol), n
