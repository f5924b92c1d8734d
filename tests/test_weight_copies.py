"""bf16 weight copies (lm.kernels.weight_copies): the same training as autocast's casts, with and without
the compiled kernels, and copies that never outlive the loop or go stale."""

from __future__ import annotations

import pytest
import torch

from lm import kernels
from lm.engine.step import train_epoch
from lm.kernels.weight_copies import COPY_ATTR, WeightCopies, applies, product_matrices, product_weight
from lm.model.language_model import LanguageModel

BF16 = torch.bfloat16


def _model(seed: int = 0, **options) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(50, 16, 2, 0.3, 0.1, **options)


def _windows(n: int = 4, batch: int = 4, bptt: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 50, (batch, n * bptt + 1), generator=g)
    return [(data[:, i * bptt : (i + 1) * bptt], data[:, i * bptt + 1 : (i + 1) * bptt + 1]) for i in range(n)]


def _train(copies: bool, max_grad_norm: float, weight_decay: float = 0.0, **options) -> tuple[LanguageModel, list[float]]:
    model = _model(**options)
    norms = []
    torch.manual_seed(5)  # the dropout masks
    train_epoch(
        model,
        _windows(),
        torch.optim.SGD(model.parameters(), lr=0.9),
        max_grad_norm,
        weight_copies=copies,
        autocast_dtype=BF16,
        weight_decay=weight_decay,
        log_every=1,
        on_log=lambda step, nll, norm: norms.append(norm),
    )
    return model, norms


@pytest.fixture(params=["kernels", "pytorch"])
def path(request, monkeypatch):
    """Both paths: the compiled kernels (where built) and pure PyTorch."""
    if request.param == "kernels":
        if not kernels.available("cpu"):
            pytest.skip("the fused kernels are not built here")
    else:
        monkeypatch.setattr(kernels, "available", lambda device: False)
    return request.param


def test_training_with_copies_is_autocast_training_to_the_bit_when_nothing_is_clipped(path):
    """No clipping (the scale is 1): the same products, gradients and fp32 updates, so the same weights."""
    with_copies, norms = _train(True, 1e9)
    without, reference_norms = _train(False, 1e9)
    for (name, a), b in zip(with_copies.named_parameters(), without.parameters()):
        assert torch.equal(a, b), name
    assert norms == pytest.approx(reference_norms, rel=1e-6)  # the norm is summed in another order


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_clipped_training_with_copies_matches_autocast_training(path, weight_decay):
    """Clipped every step (and Gal's shrink): the clip factor comes from a norm summed in another
    order, so the weights agree to rounding, not to the bit."""
    with_copies, norms = _train(True, 0.05, weight_decay)
    without, reference_norms = _train(False, 0.05, weight_decay)
    assert norms == pytest.approx(reference_norms, rel=1e-5)
    for (name, a), b in zip(with_copies.named_parameters(), without.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_kernel_update_equals_sgd_and_a_cast():
    if not kernels.available("cpu"):
        pytest.skip("the fused kernels are not built here")
    torch.manual_seed(0)
    weight = torch.randn(1000, 37)
    grad = torch.randn(1000, 37).to(BF16)
    copy = torch.empty(1000, 37, dtype=BF16)
    expected = weight.clone().add_(grad.float(), alpha=-0.37)
    kernels.fused().sgd_bf16_copy(weight, grad, copy, -0.37)
    assert torch.equal(weight, expected)
    assert torch.equal(copy, expected.to(BF16))


def test_copies_are_gone_after_the_loop_and_refreshed_when_a_weight_changes():
    model = _model()
    weights = product_matrices(model)
    assert len(weights) == 5  # two layers' input and recurrent weights, the decoder's
    with WeightCopies(model):
        w = weights[0]
        copy = product_weight(w, BF16)
        assert copy.dtype == BF16 and copy.is_leaf and copy.requires_grad
        assert product_weight(w, torch.float32) is not copy  # fp32 products read the weight itself
        with torch.no_grad():
            w.mul_(2)  # as a checkpoint load or a shrink would
        assert torch.equal(product_weight(w, BF16), w.detach().to(BF16))
    assert not any(hasattr(w, COPY_ATTR) for w in weights)
    train_epoch(model, _windows(1), torch.optim.SGD(model.parameters(), lr=0.9), 5.0, autocast_dtype=BF16)
    assert not any(hasattr(w, COPY_ATTR) for w in weights)


def test_copies_apply_only_to_single_process_cpu_bf16_plain_sgd():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    objective = torch.nn.Identity()
    assert applies(model, sgd, objective, BF16)
    assert not applies(model, sgd, objective, None)
    assert not applies(model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), objective, BF16)
    assert not applies(model, torch.optim.Adam(model.parameters()), objective, BF16)


def test_tied_and_weight_dropped_matrices_keep_their_fp32_gradients():
    """A tied decoder's weight is also the embedding's (an fp32 lookup), a weight-dropped recurrent
    weight is computed anew each step: neither gets a copy, and training still matches."""
    tied = product_matrices(_model(tie_weights=True))
    assert len(tied) == 4
    dropped = product_matrices(_model(weight_drop=0.3))
    assert len(dropped) == 3
    with_copies, _ = _train(True, 1e9, weight_drop=0.3, tie_weights=True)
    without, _ = _train(False, 1e9, weight_drop=0.3, tie_weights=True)
    for (name, a), b in zip(with_copies.named_parameters(), without.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.full
def test_bf16_training_stopped_mid_epoch_and_resumed_is_bit_identical(tiny_corpus, tmp_path, monkeypatch):
    """The copies are not in the checkpoint: cast again from the loaded weights, they are what the
    uninterrupted run held, so a bf16 run stopped mid-epoch and resumed gives the same weights."""
    from lm.engine.training import train
    from lm.infra.checkpoint import load_checkpoint
    from lm.infra.faults import TrainingInterrupted

    from helpers import tiny_overrides, train_config

    bf16 = ("trainer.precision=bf16", "trainer.epochs=2")
    straight = train(train_config(tiny_overrides(tiny_corpus, *bf16)), tmp_path / "a")
    monkeypatch.setenv("LM_FAULT", "step:40:TERM")
    with pytest.raises(TrainingInterrupted, match="in epoch 1 at step 40"):
        train(train_config(tiny_overrides(tiny_corpus, *bf16)), tmp_path / "b")
    monkeypatch.delenv("LM_FAULT")
    resumed = train(train_config(tiny_overrides(tiny_corpus, *bf16, "trainer.resume=auto")), tmp_path / "b")
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["test_ppl"] == resumed["test_ppl"]


def test_the_norm_of_a_bf16_gradient_is_accumulated_in_fp32(path):
    """The clip norm of a copy's bf16 gradient: the kernel reads it once as bf16 (no fp32 copy),
    the fallback copies; both agree with the fp32 norm of the same values, not bf16's rounding."""
    from lm.kernels.weight_copies import fp32_norm

    torch.manual_seed(0)
    grad = (torch.randn(300, 1001) * 3).to(BF16)
    exact = torch.linalg.vector_norm(grad.double()).item()
    norm = fp32_norm(grad)
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(exact, rel=1e-4)  # fp32 sums (torch: 1e-5 off)
    assert torch.linalg.vector_norm(grad).item() != pytest.approx(exact, rel=1e-4)  # what torch's own would give
