"""The LSTM cell's own training time loop (lm.model.cells.lstm) computes nn.LSTM's function and gradients, and the
training loss (lm.model.loss) F.cross_entropy's: both the compiled kernels and the pure-PyTorch fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lm import kernels
from lm.model.cells.lstm import LSTMLayer
from lm.model.loss import summed_nll

from helpers import REPO, LSTMCompiled, lstm_loop, reference_lstm

B, T, H = 3, 7, 5


def _run(fn, layer, x, state):
    """Outputs, final state and the gradient of every input and parameter for a fixed loss."""
    for p in [x, *state, *layer.parameters()]:
        p.grad = None
    out, (h, c) = fn()
    (out.sin().sum() + h.cos().sum() + 0.3 * c.sum()).backward()
    return [out.detach(), h.detach(), c.detach()] + [p.grad.clone() for p in [x, *state, *layer.parameters()]]


@pytest.fixture
def problem():
    torch.manual_seed(0)
    layer = LSTMLayer(H, H)
    x = torch.randn(B, T, H, requires_grad=True)
    state = (torch.randn(1, B, H, requires_grad=True), torch.randn(1, B, H, requires_grad=True))
    return layer, x, state


def test_matches_nn_lstm_values_and_gradients(problem, backend):
    layer, x, state = problem
    expected = _run(lambda: layer(x, state), layer, x, state)
    got = _run(lambda: layer.window(x, state), layer, x, state)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-5)


def test_saturated_gates_stay_finite_and_exact(backend):
    """Large pre-activations (sigmoid at 0 or 1, tanh at +-1) must not overflow the kernel's exp."""
    torch.manual_seed(1)
    layer = LSTMLayer(H, H)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(40)
    x = torch.randn(B, T, H, requires_grad=True)
    state = (torch.zeros(1, B, H, requires_grad=True), torch.zeros(1, B, H, requires_grad=True))
    expected = _run(lambda: layer(x, state), layer, x, state)
    got = _run(lambda: layer.window(x, state), layer, x, state)
    for a, b in zip(expected, got):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, atol=1e-4)


def test_bf16_autocast_is_close_and_keeps_fp32_state(problem, backend):
    layer, x, state = problem
    expected = _run(lambda: layer(x, state), layer, x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(lambda: layer.window(x, state), layer, x, state)
    assert [t.dtype for t in got[:3]] == [torch.float32] * 3
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=0.05, rtol=0.05)
    assert not torch.equal(expected[0], got[0])  # the products really ran in bf16


@pytest.mark.parametrize("per_step", [False, True], ids=["shared mask", "mask per step"])
def test_mask_on_h_matches_the_step_by_step_equations(problem, backend, per_step):
    layer, x, state = problem
    shape = (T, B, H) if per_step else (B, H)
    mask = (torch.rand(shape) > 0.5).float() * 2

    masks = mask if per_step else [mask] * T
    expected = _run(lambda: reference_lstm(layer, x, state, masks), layer, x, state)
    got = _run(lambda: layer.window(x, state, h_mask=mask), layer, x, state)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_and_fallback_agree_in_bf16_with_a_mask(problem):
    """The two implementations round the same products the same way: only the element-wise
    functions (exp, tanh) differ in their last bits."""
    if kernels.fused() is None:
        pytest.skip("no compiler here")
    layer, x, state = problem
    mask = (torch.rand(T, B, H) > 0.3).float() / 0.7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _run(lambda: layer.window(x, state, h_mask=mask), layer, x, state)
        kernels_available = kernels.available
        try:
            kernels.available = lambda device: False
            fallback = _run(lambda: layer.window(x, state, h_mask=mask), layer, x, state)
        finally:
            kernels.available = kernels_available
    for a, b in zip(fused, fallback):
        assert torch.allclose(a, b, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_summed_nll_matches_cross_entropy(backend, autocast):
    torch.manual_seed(0)
    decoder = torch.nn.Linear(H, 13)
    hidden = torch.randn(B, T, H, requires_grad=True)
    targets = torch.randint(0, 13, (B, T))

    def grads(fn):
        for p in [hidden, *decoder.parameters()]:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        (loss / B).backward()
        return [loss.detach()] + [p.grad.clone() for p in [hidden, *decoder.parameters()]]

    with torch.no_grad():
        reference_logits = decoder(hidden)
    reference = grads(lambda: F.cross_entropy(decoder(hidden).reshape(-1, 13).float(), targets.reshape(-1), reduction="sum"))
    got = grads(lambda: summed_nll(decoder, hidden, targets))
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    for a, b in zip(reference, got):
        assert torch.allclose(a, b, **tol)
    assert reference_logits.shape == (B, T, 13)


def test_summed_nll_with_extreme_logits_is_finite(backend):
    decoder = torch.nn.Linear(H, 7)
    with torch.no_grad():
        decoder.weight.mul_(1e3)
    hidden = torch.randn(4, H, requires_grad=True)
    targets = torch.tensor([0, 3, 6, 2])
    loss = summed_nll(decoder, hidden, targets)
    expected = F.cross_entropy(decoder(hidden), targets, reduction="sum")
    assert torch.isfinite(loss) and torch.allclose(loss, expected, rtol=1e-4)


@pytest.mark.full
def test_without_a_compiler_training_falls_back_with_one_warning(tmp_path):
    """No compiler: one warning line, then the pure-PyTorch path trains and computes the same loss."""
    script = (
        "import torch, torch.nn.functional as F\n"
        "from lm import kernels\n"
        "from lm.model.loss import summed_nll\n"
        "assert kernels.fused() is None and not kernels.available('cpu')\n"
        "torch.manual_seed(0)\n"
        "dec = torch.nn.Linear(4, 9); h = torch.randn(6, 4); y = torch.randint(0, 9, (6,))\n"
        "assert torch.equal(summed_nll(dec, h, y), F.cross_entropy(dec(h), y, reduction='sum'))\n"
        "print('fallback ok')\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("LM_FUSED", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "fused CPU kernels unavailable" in line]
    assert len(warnings) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_build_name_depends_on_the_source_and_the_cpu(monkeypatch):
    name = kernels.build_name()
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "some other cpu")
    assert kernels.build_name() != name and kernels.build_name().startswith("lm_fused_")


def test_build_name_depends_on_the_torch_install(monkeypatch):
    """Two environments (two torch installs) sharing one extension folder build apart, instead of
    rewriting one build file with their own header paths and rebuilding on every run."""
    name = kernels.build_name()
    monkeypatch.setattr(kernels.torch, "__file__", "/another/venv/site-packages/torch/__init__.py")
    assert kernels.build_name() != name


def test_every_checkout_builds_from_one_copy_of_the_source(tmp_path, monkeypatch):
    """The build reads the source from its own folder, written once: a second checkout (another path,
    the same source) finds the build up to date instead of rebuilding it under the first one's runs."""
    import torch.utils.cpp_extension as cpp_extension

    loads = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LM_FUSED", raising=False)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: loads.append(kwargs) or "module")
    assert kernels.fused.__wrapped__() == "module"
    copy = tmp_path / kernels.build_name() / kernels.SOURCE.name
    assert loads[0]["sources"] == [str(copy)] and copy.read_text() == kernels.SOURCE.read_text()
    written = copy.stat().st_mtime_ns
    kernels.fused.__wrapped__()
    assert loads[1]["sources"] == [str(copy)] and copy.stat().st_mtime_ns == written  # not rewritten: nothing to rebuild


# ---------------------------------------------------------------- the GPU path: window_loop under torch.compile


def _window_inputs(layer, x, state):
    x_proj = torch.nn.functional.linear(x, layer.weight_ih_l0, layer.bias_ih_l0 + layer.bias_hh_l0).transpose(0, 1)
    return x_proj, state[0][0], state[1][0], layer.weight_hh_l0


@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_loop_is_the_eager_window(problem, mask_kind, dtype):
    """What the GPU compiles is the same function, with the same gradients, as LSTMWindow (every mask kind, bf16)."""
    from lm.model.cells.lstm import LSTMWindow

    layer, x, state = problem
    g = torch.Generator().manual_seed(1)
    mask = {
        "none": None,
        "shared": (torch.rand(B, H, generator=g) > 0.3) / 0.7,
        "per_step": (torch.rand(T, B, H, generator=g) > 0.3) / 0.7,
    }[mask_kind]
    run = lambda fn: _run(
        lambda: (lambda o, h, c: (o.transpose(0, 1), (h, c)))(*fn(*_window_inputs(layer, x, state), mask, dtype)),  # noqa: E731
        layer,
        x,
        state,
    )
    for a, b in zip(run(LSTMWindow.apply), run(lstm_loop)):
        assert torch.allclose(a, b, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.slow
def test_torch_compile_of_the_window_matches_nn_lstm(problem):
    """The real torch.compile (inductor's CPU backend here; Triton on a GPU) of the masked window."""
    if kernels.fused() is None:
        pytest.skip("no compiler here: inductor cannot build its CPU kernels either")
    layer, x, state = problem
    masks = (torch.rand(T, B, H, generator=torch.Generator().manual_seed(2)) > 0.3) / 0.7
    compiled = LSTMCompiled()
    expected = _run(lambda: reference_lstm(layer, x, state, masks), layer, x, state)
    got = _run(
        lambda: (lambda o, h, c: (o.transpose(0, 1), (h, c)))(*compiled(*_window_inputs(layer, x, state), masks, torch.float32)),
        layer,
        x,
        state,
    )
    assert not compiled.failed
    for a, b in zip(expected, got):
        assert torch.allclose(a, b.reshape(a.shape), atol=1e-5)


def test_a_failed_compile_warns_once_then_gives_way_to_the_eager_window(problem, caplog):
    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError("Cannot find a working triton installation\nmore detail")

        return run

    layer, x, state = problem
    compiled = LSTMCompiled(broken_compile)
    with caplog.at_level("WARNING", logger="lm.recurrence"):
        assert compiled(*_window_inputs(layer, x, state), None, torch.float32) is None
        assert compiled(*_window_inputs(layer, x, state), None, torch.float32) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "compiling the LSTM window failed (Cannot find a working triton installation); training runs the slower eager loop"
    ]


def _counting_compile(graphs: list):
    """torch.compile with a backend that counts the graphs it is given and runs them as traced."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return lambda fn, **options: torch.compile(fn, backend=backend, **options)


def test_one_compiled_step_serves_windows_of_every_length(problem):
    """A window's step is what is compiled, not the unrolled window: windows of 7, 3, 1 and 12 steps
    (an epoch's last window is shorter; Monte Carlo evaluation reads 500) add no compile. Two graphs:
    the first step, whose carried state needs no gradient, and the others."""
    from lm.model.cells.lstm import LSTMWindow

    torch._dynamo.reset()
    graphs = []
    compiled = LSTMCompiled(_counting_compile(graphs))
    layer, _, _ = problem
    for steps in (7, 3, 1, 12):
        x = torch.randn(B, steps, H)
        h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
        x_proj, _, _, w_hh = _window_inputs(layer, x, ([h0], [c0]))
        out, h, c = compiled(x_proj, h0, c0, w_hh, None, torch.float32)
        expected = LSTMWindow.apply(x_proj, h0, c0, w_hh, None, torch.float32)
        assert torch.allclose(out, expected[0], atol=1e-6) and torch.allclose(c, expected[2], atol=1e-6)
        (out.sum() + c.sum()).backward()
    assert len(graphs) == 2 and compiled.status() == {
        "path": "compiled step (torch.compile)",
        "fallback_reason": None,
        "compiled_signatures": 2,
        "windows_compiled": 4,
    }


@pytest.mark.full
def test_the_compiled_step_through_aot_autograd_matches_the_eager_window(problem):
    """A real compile of the step, forward and backward graphs (AOTAutograd, the eager backend: no C++
    or Triton build), against the eager window, values and gradients, with per-step masks."""
    from lm.model.cells.lstm import LSTMWindow

    torch._dynamo.reset()
    layer, x, state = problem
    masks = (torch.rand(T, B, H, generator=torch.Generator().manual_seed(3)) > 0.3) / 0.7
    compiled = LSTMCompiled(lambda fn, **options: torch.compile(fn, backend="aot_eager", **options))
    run = lambda fn: _run(  # noqa: E731
        lambda: (lambda o, h, c: (o.transpose(0, 1), (h, c)))(*fn(*_window_inputs(layer, x, state), masks, torch.float32)),
        layer,
        x,
        state,
    )
    for a, b in zip(run(LSTMWindow.apply), run(compiled)):
        assert torch.allclose(a, b, atol=1e-5)
    assert not compiled.failed


class _BackwardFails(torch.autograd.Function):
    """Stands in for a compiled graph whose backward fails to compile (lazily, at its first use)."""

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("InductorError: backward graph failed to compile\nmore detail")


def test_a_backward_that_fails_to_compile_is_caught_before_any_training_step_needs_it(problem, caplog):
    """AOTAutograd compiles a backward at its first use, inside the training step's backward(), where
    a failure could not fall back. The first call of each new step signature compiles both ways on a
    copy of its inputs, so the failure surfaces there: one warning, the eager window, and why in the status."""

    def compile_with_broken_backward(fn, **options):
        def run(*args):
            h, c = fn(*args)
            return _BackwardFails.apply(h), c

        return run

    layer, x, state = problem
    compiled = LSTMCompiled(compile_with_broken_backward)
    with caplog.at_level("WARNING", logger="lm.recurrence"):
        assert compiled(*_window_inputs(layer, x, state), None, torch.float32) is None
    assert [r.getMessage() for r in caplog.records] == [
        "compiling the LSTM window failed (InductorError: backward graph failed to compile); training runs the slower eager loop"
    ]
    assert compiled.status()["path"] == "eager loop"
    assert compiled.status()["fallback_reason"] == "InductorError: backward graph failed to compile"
    with torch.no_grad():  # the same compiled forward without gradients has nothing to fail, but the choice is made
        assert compiled(*_window_inputs(layer, x, state), None, torch.float32) is None


def test_gpu_evaluation_runs_the_eager_loop_and_gpu_training_the_compiled_step():
    """Monte Carlo dropout evaluates with dropout on, h_{t-1} masked, in windows of 500 steps and an odd
    last one per split: compiling each would take minutes. Without gradients the eager loop runs."""
    from lm.model.cells.loop import window_path

    cuda = torch.device("cuda")
    assert window_path(cuda) == "compiled"
    with torch.no_grad():
        assert window_path(cuda) == "eager"
    assert window_path(torch.device("meta")) == "eager"


def test_lm_compile_0_turns_compiling_off(monkeypatch):
    monkeypatch.setenv("LM_COMPILE", "0")
    compiled = LSTMCompiled(lambda fn, **options: pytest.fail("compiled although LM_COMPILE=0"))
    assert compiled.failed and compiled(None, None, None, None, None, torch.float32) is None


@pytest.mark.slow
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_run():
    """torch's build lock is a file; a process killed while loading leaves it, and torch's next load
    waits for it forever. Ours must not (the current build, up to date, so nothing is compiled here)."""
    if kernels.fused() is None:
        pytest.skip("no compiler here")
    lock = kernels.build_root() / kernels.build_name() / "lock"
    lock.write_text("")  # as a process killed mid-load leaves it
    code = "from lm import kernels; assert kernels.fused() is not None"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not lock.exists()
