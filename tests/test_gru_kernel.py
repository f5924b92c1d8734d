"""The fused GRU window (lm.model.cells.gru_kernel on lm/kernels/csrc/fused.cpp) computes nn.GRU's
function and gradients, and with a mask on h_{t-1} the step-by-step equations (the interpolation on
the unmasked h_{t-1}); in bf16 products within bf16's error; bad inputs get the kernel's message."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lm import kernels
from lm.model.cells.gru_kernel import FusedGRUWindow

B, T, H = 3, 5, 7
GRADS = ["x", "h0", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
# bf16 keeps 8 significant bits (a relative step of 2^-8 = 0.4%); after a few steps' products the largest
# error seen is 0.45% of a tensor's largest value (bias_ih's gradient, mask per step): 2% leaves room
BF16_TOL = 2e-2


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    if kernels.fused() is None:
        pytest.skip("no compiler here: the fused kernels are unavailable", allow_module_level=True)


def make_problem(batch=B, steps=T, hidden=H, seed=0):
    torch.manual_seed(seed)
    gru = torch.nn.GRU(hidden, hidden, batch_first=True)
    x = torch.randn(batch, steps, hidden, requires_grad=True)
    h0 = torch.randn(batch, hidden, requires_grad=True)
    return gru, x, h0


def dropout_mask(shape, keep=0.6):
    return (torch.rand(shape) < keep).float() / keep


def fused_window(gru, x, h0, mask=None, dtype=torch.float32):
    """The kernel on nn.GRU's parameters: x_proj = W_ih x + b_ih + [b_hr, b_hz, 0], b_hn apart."""
    b_hh = gru.bias_hh_l0
    hidden = gru.hidden_size
    folded = torch.cat([b_hh[: 2 * hidden], b_hh.new_zeros(hidden)])
    x_proj = F.linear(x, gru.weight_ih_l0, gru.bias_ih_l0 + folded)
    return FusedGRUWindow.apply(x_proj.to(dtype).contiguous(), h0, gru.weight_hh_l0.to(dtype), b_hh[2 * hidden :], mask)


def nn_gru_window(gru, x, h0, mask=None):
    out, h = gru(x, h0.unsqueeze(0))
    return out, h[0]


def reference_window(gru, x, h0, mask=None, masked_interpolation=False):
    """The GRU equations step by step in plain PyTorch (autograd derives the gradients). The mask is on
    h_{t-1} where it enters the products; the interpolation takes the unmasked h_{t-1} unless
    ``masked_interpolation`` (the variant the kernel must not compute)."""
    w_hr, w_hz, w_hn = gru.weight_hh_l0.chunk(3)
    b_hr, b_hz, b_hn = gru.bias_hh_l0.chunk(3)
    x_r, x_z, x_n = F.linear(x, gru.weight_ih_l0, gru.bias_ih_l0).chunk(3, dim=2)
    h, outputs = h0, []
    for t in range(x.size(1)):
        m = None if mask is None else mask if mask.dim() == 2 else mask[t]
        h_in = h if m is None else h * m
        r = torch.sigmoid(x_r[:, t] + h_in @ w_hr.t() + b_hr)
        z = torch.sigmoid(x_z[:, t] + h_in @ w_hz.t() + b_hz)
        n = torch.tanh(x_n[:, t] + r * (h_in @ w_hn.t() + b_hn))
        h = (1 - z) * n + z * (h_in if masked_interpolation else h)
        outputs.append(h)
    return torch.stack(outputs, 1), h


def run(window, gru, x, h0, loss="both", **kwargs):
    """Outputs, final h and the gradient of every input and parameter for a fixed loss: ``out``,
    ``h`` or ``both`` of the window's results reach it."""
    for p in [x, h0, *gru.parameters()]:
        p.grad = None
    out, h = window(gru, x, h0, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    terms = {"out": (out.sin() * weights).sum(), "h": (h.cos() * 0.7).sum()}
    value = terms["out"] + terms["h"] if loss == "both" else terms[loss]
    value.backward()
    grads = [x.grad, h0.grad, *(p.grad for p in gru.parameters())]
    return dict(zip(["out", "h", *GRADS], [out.detach(), h.detach(), *(g.clone() for g in grads)]))


def run_double(window, gru, x, h0, mask=None, **kwargs):
    """``run`` on fp64 copies: the exact answer the fp32 and bf16 kernels are measured against."""
    gru64 = copy.deepcopy(gru).double()
    x64 = x.detach().double().requires_grad_()
    h64 = h0.detach().double().requires_grad_()
    mask64 = None if mask is None else mask.double()
    return {k: v.float() for k, v in run(window, gru64, x64, h64, mask=mask64, **kwargs).items()}


def assert_close_fp32(got, expected):
    for name in expected:
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def max_relative_error(got, expected):
    return (got - expected).abs().max().item() / expected.abs().max().item()


# ---------------------------------------------------------------- against nn.GRU


@pytest.mark.parametrize("steps", [T, 1], ids=["T=5", "T=1"])
def test_matches_nn_gru_values_and_every_gradient(steps):
    gru, x, h0 = make_problem(steps=steps)
    assert_close_fp32(run(fused_window, gru, x, h0), run(nn_gru_window, gru, x, h0))


def test_matches_nn_gru_on_rows_split_across_threads():
    """A batch big enough for parallel_for to split the rows (grain: about 16K elements a task), and
    H not a multiple of the vector width. Measured against fp64: the weight gradients sum B * T terms
    of up to ~10, so fp32's summation order alone moves them by ~1e-5 (nn.GRU's own are as far off)."""
    gru, x, h0 = make_problem(batch=64, steps=3, hidden=97)
    got, exact = run(fused_window, gru, x, h0), run_double(nn_gru_window, gru, x, h0)
    for name in exact:
        assert max_relative_error(got[name], exact[name]) < 3e-6, name  # seen: 7e-7 at most


def test_saturated_gates_stay_finite_and_exact():
    """Large pre-activations (sigmoid at 0 or 1, tanh at +-1) must not overflow the kernel's exp."""
    gru, x, h0 = make_problem(seed=1)
    with torch.no_grad():
        for p in gru.parameters():
            p.mul_(40)
    got, expected = run(fused_window, gru, x, h0), run(nn_gru_window, gru, x, h0)
    for name in expected:
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- masks on h_{t-1}


def test_the_reference_loop_is_nn_gru_without_a_mask():
    gru, x, h0 = make_problem()
    assert_close_fp32(run(reference_window, gru, x, h0), run(nn_gru_window, gru, x, h0))


@pytest.mark.parametrize("per_step", [False, True], ids=["shared mask", "mask per step"])
def test_mask_on_h_matches_the_step_by_step_equations(per_step):
    gru, x, h0 = make_problem()
    mask = dropout_mask((T, B, H) if per_step else (B, H))
    got = run(fused_window, gru, x, h0, mask=mask)
    assert_close_fp32(got, run_double(reference_window, gru, x, h0, mask=mask))
    # the interpolation z * h_{t-1} takes the unmasked h_{t-1}: the other reading is far off
    other = run_double(reference_window, gru, x, h0, mask=mask, masked_interpolation=True)
    assert (got["out"] - other["out"]).abs().max() > 1e-2
    assert (got["h0"] - other["h0"]).abs().max() > 1e-2


def test_an_all_zero_mask_leaves_only_the_interpolation_carrying_h():
    """With h_in = 0 every gate sees only x (and b_hn), yet h_{t-1} still flows through z * h_{t-1}."""
    gru, x, h0 = make_problem()
    got = run(fused_window, gru, x, h0, mask=torch.zeros(B, H))
    assert_close_fp32(got, run_double(reference_window, gru, x, h0, mask=torch.zeros(B, H)))
    assert got["weight_hh_l0"].abs().max() == 0  # no product saw a nonzero input
    assert got["h0"].abs().min() > 0


# ---------------------------------------------------------------- bf16 products


@pytest.mark.parametrize("mask_shape", [None, (B, H), (T, B, H)], ids=["no mask", "shared mask", "mask per step"])
def test_bf16_products_are_close_to_fp32_and_keep_fp32_outputs(mask_shape):
    gru, x, h0 = make_problem()
    mask = None if mask_shape is None else dropout_mask(mask_shape)
    out, h = fused_window(gru, x, h0, mask=mask, dtype=torch.bfloat16)
    assert out.dtype == h.dtype == torch.float32
    got = run(fused_window, gru, x, h0, mask=mask, dtype=torch.bfloat16)
    expected = run_double(reference_window, gru, x, h0, mask=mask)
    for name in expected:
        assert max_relative_error(got[name], expected[name]) < BF16_TOL, name
    fp32 = run(fused_window, gru, x, h0, mask=mask)
    assert not torch.equal(fp32["out"], got["out"])  # the products really ran in bf16


def test_bf16_gradients_come_back_in_the_product_dtype():
    gru, x, h0 = make_problem()
    x_proj = torch.randn(B, T, 3 * H, dtype=torch.bfloat16, requires_grad=True)
    w_hh = gru.weight_hh_l0.detach().bfloat16().requires_grad_()
    b_hn = torch.zeros(H, requires_grad=True)
    out, h = FusedGRUWindow.apply(x_proj, h0, w_hh, b_hn, None)
    (out.sum() + h.sum()).backward()
    assert x_proj.grad.dtype == w_hh.grad.dtype == torch.bfloat16
    assert h0.grad.dtype == b_hn.grad.dtype == torch.float32


# ---------------------------------------------------------------- one output only


@pytest.mark.parametrize("loss", ["out", "h"], ids=["only out (d_h None)", "only h_last (d_out None)"])
@pytest.mark.parametrize("mask_shape", [None, (T, B, H)], ids=["no mask", "mask per step"])
def test_gradients_when_only_one_output_reaches_the_loss(loss, mask_shape):
    gru, x, h0 = make_problem()
    mask = None if mask_shape is None else dropout_mask(mask_shape)
    got = run(fused_window, gru, x, h0, loss=loss, mask=mask)
    assert_close_fp32(got, run_double(reference_window, gru, x, h0, loss=loss, mask=mask))


def test_backward_takes_none_for_d_out_as_zeros():
    gru, x, h0 = make_problem()
    x_proj = torch.randn(B, T, 3 * H)
    w_hh, b_hn = gru.weight_hh_l0.detach(), torch.randn(H)
    mask, h0 = dropout_mask((B, H)), h0.detach()
    out, _, *saved = kernels.fused().gru_forward(x_proj, h0, w_hh, b_hn, mask)
    d_h = torch.randn(B, H)
    with_none = kernels.fused().gru_backward(None, d_h, *saved, out, h0, w_hh, mask)
    with_zeros = kernels.fused().gru_backward(torch.zeros(B, T, H), d_h, *saved, out, h0, w_hh, mask)
    for a, b in zip(with_none, with_zeros):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input


def _good():
    return {
        "x_proj": torch.randn(B, T, 3 * H),
        "h0": torch.randn(B, H),
        "w_hh": torch.randn(3 * H, H),
        "b_hn": torch.randn(H),
        "h_mask": None,
    }


BAD_FORWARD = {
    "x_proj not a multiple of 3": {"x_proj": torch.randn(B, T, 3 * H + 1)},
    "x_proj 2-D": {"x_proj": torch.randn(B, 3 * H)},
    "empty window": {"x_proj": torch.randn(B, 0, 3 * H)},
    "x_proj strided": {"x_proj": torch.randn(T, B, 3 * H).transpose(0, 1)},
    "x_proj fp64": {"x_proj": torch.randn(B, T, 3 * H, dtype=torch.float64), "w_hh": torch.randn(3 * H, H, dtype=torch.float64)},
    "h0 wrong width": {"h0": torch.randn(B, H + 1)},
    "h0 wrong batch": {"h0": torch.randn(B + 1, H)},
    "h0 bf16": {"h0": torch.randn(B, H).bfloat16()},
    "w_hh 4H rows": {"w_hh": torch.randn(4 * H, H)},
    "w_hh other dtype": {"w_hh": torch.randn(3 * H, H).bfloat16()},
    "b_hn 3H": {"b_hn": torch.randn(3 * H)},
    "mask wrong width": {"h_mask": torch.ones(B, H + 1)},
    "mask wrong steps": {"h_mask": torch.ones(T + 1, B, H)},
    "mask 1-D": {"h_mask": torch.ones(H)},
    "mask fp64": {"h_mask": torch.ones(B, H, dtype=torch.float64)},
}


@pytest.mark.parametrize("bad", BAD_FORWARD.values(), ids=BAD_FORWARD.keys())
def test_bad_forward_input_gets_the_kernels_message(bad):
    args = _good() | bad
    with pytest.raises(RuntimeError, match="lm fused kernel"):
        kernels.fused().gru_forward(*args.values())


@pytest.mark.parametrize(
    "bad",
    [{"d_out": torch.zeros(B, T + 1, H)}, {"d_h_last": torch.zeros(B, H + 1)}, {"h_mask": torch.ones(B + 1, H)}],
    ids=["d_out wrong steps", "d_h_last wrong width", "mask wrong batch"],
)
def test_bad_backward_input_gets_the_kernels_message(bad):
    good = _good()
    out, _, acts, gh_n, h_in = kernels.fused().gru_forward(*good.values())
    args = {"d_out": torch.zeros(B, T, H), "d_h_last": torch.zeros(B, H), "acts": acts, "gh_n": gh_n, "h_in": h_in}
    args |= {"out": out, "h0": good["h0"], "w_hh": good["w_hh"], "h_mask": None} | bad
    with pytest.raises(RuntimeError, match="lm fused kernel"):
        kernels.fused().gru_backward(*args.values())
