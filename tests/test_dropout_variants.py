"""Each dropout strategy puts its masks where it should and nowhere else."""

from __future__ import annotations

import pytest
import torch

import lm.model.language_model
from lm.data.batching import batchify
from lm.engine.evaluation import evaluate, evaluate_mc
from lm.model.language_model import LanguageModel

from helpers import record_layer_calls, reference_lstm

V, H = 30, 8


def make(variant: str, **rates) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(V, H, 2, rates.pop("dropout", 0.5), 0.3, variant=variant, **rates)


VARIANT_MODELS = {
    "zaremba": dict(),
    "variational": dict(dropout_embedding=0.3, dropout_input=0.4, dropout_recurrent=0.3, dropout_output=0.4),
    "recurrent": dict(dropout_recurrent=0.3),
    "none": dict(),
    "zaremba+weight_drop": dict(weight_drop=0.5),
    "variational+weight_drop": dict(dropout_input=0.4, dropout_recurrent=0.3, weight_drop=0.5),
    "zaremba+tied": dict(tie_weights=True),
}


def build(name: str) -> LanguageModel:
    return make(name.split("+")[0], **VARIANT_MODELS[name])


@pytest.mark.parametrize("name", VARIANT_MODELS)
def test_gradients_reach_every_parameter(name):
    model = build(name).train()
    logits, _ = model(torch.randint(0, V, (3, 6)), model.init_state(3))
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", VARIANT_MODELS)
def test_eval_mode_is_deterministic_and_mask_free(name):
    model = build(name).eval()
    x = torch.randint(0, V, (2, 7))
    a, _ = model(x, model.init_state(2))
    b, _ = model(x, model.init_state(2))
    assert torch.equal(a, b)
    plain = LanguageModel(V, H, 2, 0.0, 0.3, tie_weights="tied" in name)
    plain.load_state_dict(
        {k.replace("parametrizations.weight_hh_l0.original", "weight_hh_l0"): v for k, v in model.state_dict().items()}
    )
    assert torch.allclose(plain.eval()(x, plain.init_state(2))[0], a, atol=1e-6)


@pytest.mark.parametrize("name", VARIANT_MODELS)
def test_mc_dropout_with_one_deterministic_pass_equals_plain_evaluation(name):
    model = build(name)
    data = batchify(torch.randint(0, V, (200,)), 4)
    assert evaluate_mc(model, data, 5, samples=1, stochastic=False) == evaluate(model, data, 5)
    nll_mc, _ = evaluate_mc(model, data, 5, samples=3)
    if name != "none":
        assert nll_mc != evaluate(model, data, 5)[0]  # dropout really was on


@pytest.mark.parametrize("name", VARIANT_MODELS)
def test_only_none_draws_no_masks_in_training(name):
    """Variant none: a training pass leaves the generator untouched and computes evaluation's output,
    with every rate set (it reads none of them); every other variant draws masks from it."""
    model = make("none", **{**VARIANT_MODELS["variational"], "dropout": 0.5}) if name == "none" else build(name)
    model.train()
    x = torch.randint(0, V, (2, 5))
    before = torch.get_rng_state()
    trained = model(x, model.init_state(2))[0]
    drew = not torch.equal(torch.get_rng_state(), before)
    assert drew == (name != "none")
    if name == "none":
        assert torch.allclose(trained, model.eval()(x, model.init_state(2))[0], atol=1e-6)


def _recorded_locked_masks(monkeypatch):
    masks = []
    original = lm.model.language_model.locked_mask

    def record(batch, features, p, like, share):
        m = original(batch, features, p, like, share)
        masks.append((p, m))
        return m

    monkeypatch.setattr(lm.model.language_model, "locked_mask", record)
    return masks


def test_variational_masks_are_shared_over_time(monkeypatch):
    masks = _recorded_locked_masks(monkeypatch)
    calls = record_layer_calls(monkeypatch)
    model = make("variational", dropout_input=0.5, dropout_output=0.5).train()
    inputs = []
    model.layers[1].register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    x = torch.randint(0, V, (4, 9))
    model(x, model.init_state(4))
    assert [m.shape for _, m in masks] == [(4, 1, H)] * 3  # input of each layer, top output: one mask per row
    assert calls == []  # no recurrent rate: the fused kernel ran, h_{t-1} unmasked
    zeros = inputs[0] == 0  # input of layer 2, [batch, time, H]: the same units dropped at every step
    assert zeros.any() and torch.equal(zeros, zeros[:, :1].expand_as(zeros))


def test_variational_embedding_drops_word_types_in_the_whole_sequence():
    model = make("variational", dropout_embedding=0.5).train()
    captured = []
    model.layers[0].register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    x = torch.tensor([[3, 5, 3, 5, 3, 5, 3, 5]] * 6)
    model(x, model.init_state(6))
    dropped = (captured[0] == 0).all(-1)  # input of layer 1, [batch, time]
    for row, ids in zip(dropped, x):
        for word in (3, 5):
            flags = row[ids == word]
            assert flags.all() or not flags.any()  # a word type is dropped everywhere in its row, or nowhere
    assert dropped.any() and not dropped.all()


def test_variational_recurrent_mask_is_one_per_row_on_h_only(monkeypatch):
    calls = record_layer_calls(monkeypatch)
    model = make("variational", dropout_recurrent=0.5).train()
    x = torch.randint(0, V, (3, 6))
    model(x, model.init_state(3))
    assert len(calls) == 2
    for layer, layer_input, state, h_mask, out in calls:
        assert h_mask.shape == (3, H)  # one mask per row, shared by every step
        assert set(h_mask.unique().tolist()) == {0.0, 2.0}  # inverted dropout at rate 0.5
        assert torch.allclose(out, reference_lstm(layer, layer_input, state, [h_mask] * 6)[0], atol=1e-6)
        fused, _ = layer(layer_input, state)
        assert not torch.allclose(out, fused, atol=1e-4)  # the mask really reached h_{t-1}


def test_recurrent_variant_masks_the_recurrent_input_afresh_every_step(monkeypatch):
    calls = record_layer_calls(monkeypatch)
    model = make("recurrent", dropout=0.0, dropout_recurrent=0.5).train()
    x = torch.randint(0, V, (4, 9))
    model(x, model.init_state(4))
    for layer, layer_input, state, h_mask, out in calls:
        assert h_mask.shape == (9, 4, H)  # [time, batch, H]: one mask per step
        assert len({tuple(m.flatten().tolist()) for m in h_mask}) > 1  # fresh at every step
        assert torch.allclose(out, reference_lstm(layer, layer_input, state, h_mask)[0], atol=1e-6)
        fused, _ = layer(layer_input, state)
        assert not torch.allclose(out, fused, atol=1e-4)


def test_weight_drop_masks_hidden_weights_only_and_once_per_forward():
    model = make("zaremba", dropout=0.0, weight_drop=0.5).train()
    layer = model.layers[0]
    w_ih = layer.weight_ih_l0.clone()
    assert torch.equal(layer.weight_ih_l0, w_ih)  # the input weights are not dropped
    a = layer.weight_hh_l0
    assert (a == 0).float().mean() > 0.3  # about half of the recurrent weights dropped
    x = torch.randint(0, V, (2, 5))
    assert not torch.equal(model(x, model.init_state(2))[0], model(x, model.init_state(2))[0])  # a fresh mask each forward


def test_tied_weights_share_one_tensor():
    model = make("zaremba", tie_weights=True)
    assert model.decoder.weight is model.embedding.weight


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "model.dropout_variant=variational",
            "model.dropout_embedding=0.1",
            "model.dropout_input=0.3",
            "model.dropout_recurrent=0.2",
            "model.dropout_output=0.3",
            "model.weight_drop=0.2",
        ],
        ["model.dropout_variant=recurrent", "model.dropout_recurrent=0.2"],
        ["model.dropout_variant=none", "model.tie_weights=true"],
    ],
    ids=["variational+weight_drop", "recurrent", "none+tied"],
)
def test_variants_train_and_evaluate_from_the_config(overrides, shared_tiny_corpus, tmp_path):
    from lm.engine.training import train

    from helpers import tiny_overrides, train_config

    metrics = train(train_config(tiny_overrides(shared_tiny_corpus, *overrides, "trainer.max_steps=3")), tmp_path)
    assert metrics["steps"] == 3 and metrics["test_ppl"] < 100
    assert metrics["config"]["model"]["dropout_variant"] == overrides[0].split("=")[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.25, 0.5, 0.65])
def test_inverted_mask_gives_bernoullis_numbers(dtype, p):
    """The faster CPU draws of every locked, word and recurrent mask are bernoulli_'s, bit for bit."""
    from lm.model.dropout import inverted_mask

    torch.manual_seed(4)
    old_mask = torch.empty(7, 13, dtype=dtype).bernoulli_(1 - p) / (1 - p)
    torch.manual_seed(4)
    assert torch.equal(inverted_mask((7, 13), p, dtype, torch.device("cpu")), old_mask)


@pytest.fixture(params=["fused", "pytorch"])
def dropout_backend(request, monkeypatch):
    from lm import kernels

    if request.param == "fused" and kernels.fused() is None:
        pytest.skip("no compiler here")
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "available", lambda device: False)
    return request.param


@pytest.mark.parametrize("p", [0.25, 0.5, 0.65])
def test_fresh_dropout_is_dropout(dropout_backend, p):
    """Each element kept with probability 1 - p and scaled by 1 / (1 - p), a fresh mask at every
    call, the gradient through the same mask, and every mask fixed by the seed."""
    from lm.model.dropout import FreshDropout

    drop = FreshDropout(p)
    x = torch.randn(40, 35, 65).abs() + 0.5  # never 0, so zeros are dropped elements
    x.requires_grad_(True)
    torch.manual_seed(7)
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    assert torch.allclose(out[kept], x[kept] / (1 - p))
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / (1 - p)))
    again = drop(x)
    assert not torch.equal(again != 0, kept)  # a fresh mask
    torch.manual_seed(7)
    assert torch.equal(drop(x), out)  # the same seed, the same mask
    drop.eval()
    assert torch.equal(drop(x), x)


def test_hash_dropout_mask_has_no_visible_structure():
    """Masks of neighbouring elements, rows and seeds are independent as far as their correlations show."""
    from lm import kernels

    if kernels.fused() is None:
        pytest.skip("no compiler here")
    ones = torch.ones(200, 1000)
    a = kernels.fused().dropout_forward(ones, 0.5, 1, 0) / 2
    b = kernels.fused().dropout_forward(ones, 0.5, 2, 0) / 2
    centred = lambda m: m.flatten() - m.mean()  # noqa: E731
    corr = lambda u, v: float((u * v).mean() / (u.std() * v.std()))  # noqa: E731
    assert abs(corr(centred(a), centred(b))) < 0.01  # two seeds
    assert abs(corr(centred(a[:, 1:]), centred(a[:, :-1]))) < 0.01  # neighbours
    assert abs(corr(centred(a[1:]), centred(a[:-1]))) < 0.01  # rows
    assert abs(a.mean().item() - 0.5) < 0.005
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = kernels.fused().dropout_forward(ones, 0.5, 1, 0) / 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, a)  # any thread count draws the same mask


def test_batched_mc_dropout_equals_the_passes_one_after_another_with_the_same_masks(monkeypatch):
    """K stochastic passes one after another and one pass over the streams repeated K times along
    the batch average the same probabilities when each sample row meets the masks its pass met."""
    import lm.model.language_model
    from lm.engine.evaluation import evaluate_mc_batched, evaluate_mixture
    from lm.model.dropout import FreshDropout

    torch.manual_seed(0)
    samples, streams, window, places = 3, 2, 4, 3
    model = lm.model.language_model.LanguageModel(20, 8, 2, 0.5, 0.1)
    data = torch.randint(0, 20, (streams, 13))
    windows = -(-(data.size(1) - 1) // window)
    masks = {}  # (window, sample, place) -> [streams, <=window, 8]

    def mask(w, k, p, steps):
        key = (w, k, p)
        if key not in masks:
            masks[key] = (torch.rand(streams, window, 8) > 0.5).float() * 2
        return masks[key][:, :steps]

    calls = {"n": 0}

    def sequential(self, x):
        n = calls["n"]
        calls["n"] += 1
        w, k, p = n // (samples * places), (n // places) % samples, n % places
        return x * mask(w, k, p, x.size(1))

    def batched(self, x):
        n = calls["n"]
        calls["n"] += 1
        w, p = n // places, n % places
        return x * torch.cat([mask(w, k, p, x.size(1)) for k in range(samples)])

    monkeypatch.setattr(FreshDropout, "forward", sequential)  # masks whatever the mode
    one_by_one = evaluate_mixture([model] * samples, data, window, stochastic=False)  # the passes one after another
    assert calls["n"] == windows * samples * places
    monkeypatch.undo()
    calls["n"] = 0
    monkeypatch.setattr(FreshDropout, "forward", batched)
    together = evaluate_mc_batched(model, data, window, samples)
    assert calls["n"] == windows * places
    assert together[1] == one_by_one[1] == streams * (data.size(1) - 1)
    assert abs(together[0] - one_by_one[0]) < 1e-6 * abs(one_by_one[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", VARIANT_MODELS)
def test_row_shares_of_every_mask_make_the_whole_batch_masks(name, precision, dropout_backend):
    """Data parallelism: processes holding rows 0-2 and 3-5 of a batch of 6, each drawing from the same
    seed, compute exactly the rows that one process computes for the whole batch (every variant)."""
    from lm.model.dropout import WHOLE_BATCH, BatchShare

    model = build(name).train()
    ids = torch.randint(0, V, (6, 4), generator=torch.Generator().manual_seed(3))

    def features(rows: slice, share: BatchShare) -> torch.Tensor:
        model.share_batch(share)
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model.features(ids[rows], model.init_state(rows.stop - rows.start))[0].float()

    whole = features(slice(0, 6), WHOLE_BATCH)
    halves = torch.cat([features(slice(0, 3), BatchShare(0, 6)), features(slice(3, 6), BatchShare(3, 6))])
    assert torch.allclose(halves, whole, atol=1e-6)
    lone = features(slice(3, 6), WHOLE_BATCH)  # rows 3-5 as a batch of their own draw other masks
    assert name == "none" or not torch.allclose(lone, whole[3:], atol=1e-6)


def test_hash_dropout_offset_continues_the_global_index():
    from lm import kernels

    if kernels.fused() is None:
        pytest.skip("no compiler here")
    ones = torch.ones(6, 7, 5)
    whole = kernels.fused().dropout_forward(ones, 0.5, 9, 0)
    assert torch.equal(kernels.fused().dropout_forward(ones[4:].contiguous(), 0.5, 9, 4 * 35), whole[4:])
    assert not torch.equal(kernels.fused().dropout_forward(ones[4:].contiguous(), 0.5, 9, 0), whole[4:])
