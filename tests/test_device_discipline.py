"""Device discipline, proven without a GPU: every tensor of training, evaluation (both protocols),
Monte Carlo dropout, model averaging and generation is made on the model's device.

The model and the data go to the ``meta`` device (shapes, no data) while the default device
stays the CPU, under ``DeviceDiscipline``, a dispatch mode that sees every op and raises
``StrayTensorError`` (and records it, in case a caller catches it) when

- an op mixes devices (a CPU tensor beside a meta one), except a 0-dim CPU tensor read as a
  scalar, which a GPU kernel takes too. PyTorch refuses most such ops itself, but not all on
  meta: ``torch.mm`` of a meta and a CPU matrix runs;
- a tensor is copied from the device to the host (``.cpu()``);
- once work on the device has begun, a factory (``torch.zeros``, ``torch.tensor``, ...) makes a
  tensor on the host: a missing ``device=``. The one exception is a 0-dim int64
  ``torch.randint``, the draw of torch's CPU generator that seeds a mask.

Reading a device scalar on the host (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``) is a sync
on a GPU, legitimate where the loops allow one, but meta has no value to give: the mode answers
with a harmless stand-in and records where the read was (``syncs``).

Meta is no accelerator, and three things that a GPU would answer are stood in for by the
``meta_as_gpu`` fixture: torch's autocast, which refuses the ``meta`` device type outright (its
on/off state and dtype are kept for ``meta`` as a GPU's autocast reports them, so the bf16 code
paths run; its casts, which keep the device, are not applied); torch's foreach kernels, which
``clip_grad``'s ``foreach=True`` refuses on a device it does not know; and the fused CPU kernels,
which must not be asked for at all.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._foreach_utils as foreach_utils
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lm.kernels
from lm.data.batching import batchify, bptt_windows
from lm.data.corpus import Corpus, Vocab, load_corpus
from lm.engine.averaging import run_ensemble
from lm.engine.evaluation import evaluate_all, evaluate_mixture
from lm.engine.generation import sample
from lm.engine.step import train_epoch
from lm.infra.checkpoint import save_checkpoint
from lm.model.language_model import LanguageModel

from helpers import REPO, tiny_overrides, train_config, write_corpus

aten = torch.ops.aten
META = torch.device("meta")
VOCAB_SIZE = 13
# Copies between host and device (what moving data there is); a copy to the host is a stray.
TRANSFERS = (aten._to_copy.default, aten.copy_.default)
# torch.tensor(data): the data is lifted into a fresh tensor, on the host unless device= says otherwise.
LIFTS = (aten.lift_fresh.default, aten.lift_fresh_copy.default)
SEED_DRAWS = (aten.randint.default, aten.randint.low)


class StrayTensorError(AssertionError):
    """A tensor on the wrong device (an AssertionError, so that no ``except RuntimeError`` of the code hides it)."""


def stand_in_scalar(dtype: torch.dtype) -> bool | float | int:
    """What a host read of a meta scalar returns: values that keep the code on its usual path
    (True: the trainer's ``finite`` flag, so a step is applied; -1: its ``first_bad`` step,
    meaning none; 1.0: a loss)."""
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point or dtype.is_complex:
        return 1.0
    return -1


def where_in_our_code(frame) -> str:
    """file:line of the innermost frame of lm/ or tests/ from ``frame`` outwards (torch's own frames skipped)."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(REPO / "lm") or path.is_relative_to(REPO / "tests"):
            return f"{path.relative_to(REPO)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "outside lm/ and tests/"


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _written(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors ``func`` writes into (in-place and out= arguments), from its schema."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written += _tensors(args[i] if i < len(args) else kwargs.get(arg.name))
    return written


def _describe(t: torch.Tensor) -> str:
    return f"{t.device.type} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


class DeviceDiscipline(TorchDispatchMode):
    """Sees every op; raises ``StrayTensorError`` on a tensor off ``device`` (see the module docstring).
    On a real device (``cuda``) the same rules hold and scalar reads return their values."""

    def __init__(self, device: torch.device | str = META):
        super().__init__()
        self.device = torch.device(device)
        self.armed = False  # work on the device has begun: from now on the host makes no tensor
        self.strays: list[str] = []
        self.syncs: list[str] = []  # where a device scalar was read on the host
        self._caller = None

    def _on_device(self, tensors: list[torch.Tensor]) -> bool:
        return any(t.device.type == self.device.type for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._caller = sys._getframe(1)  # the code that ran the op (torch's Python or ours)
        inputs = _tensors((args, kwargs))
        if func is aten._local_scalar_dense.default and self._on_device(inputs):
            self.syncs.append(where_in_our_code(self._caller))
            if self.device.type == "meta":
                return stand_in_scalar(inputs[0].dtype)
        self.armed = self.armed or self._on_device(inputs)
        self._check_inputs(func, args, kwargs, inputs)
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        self.armed = self.armed or self._on_device(outputs)
        if self.armed:
            self._check_outputs(func, inputs, outputs)
        return out

    def _check_inputs(self, func, args: tuple, kwargs: dict, inputs: list[torch.Tensor]) -> None:
        """Before the op runs (PyTorch would raise its own, less precise error for many of them)."""
        if func in TRANSFERS:
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0].device if func is aten.copy_.default else kwargs.get("device") or source.device
            if source.device.type == self.device.type and torch.device(target).type == "cpu":
                self._stray(f"{func} copies {_describe(source)} to the host")
            return
        written = {id(t) for t in _written(func, args, kwargs)}
        checked = [t for t in inputs if not (t.device.type == "cpu" and t.dim() == 0 and id(t) not in written)]
        if len({t.device.type for t in checked}) > 1:
            self._stray(f"{func} mixes devices: {', '.join(_describe(t) for t in checked)}")

    def _check_outputs(self, func, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        host = [t for t in outputs if t.device.type == "cpu"]
        if not host:
            return
        if not inputs or func in LIFTS:
            if not (func in SEED_DRAWS and host[0].dim() == 0 and host[0].dtype == torch.int64):
                self._stray(f"{func} makes {_describe(host[0])} on the host (a missing device=?)")
        elif self._on_device(inputs):
            self._stray(f"{func} returns {_describe(host[0])} on the host from {self.device.type} inputs")

    def _stray(self, what: str) -> None:
        message = f"{what} at {where_in_our_code(self._caller)}"
        self.strays.append(message)
        raise StrayTensorError(message)


@contextlib.contextmanager
def disciplined() -> Iterator[DeviceDiscipline]:
    """``DeviceDiscipline`` around a block, which must have worked on meta, without a stray."""
    with DeviceDiscipline() as mode:
        yield mode
    assert mode.strays == [], mode.strays
    assert mode.armed, "nothing ran on meta: the work stayed on the host"


# ---------------------------------------------------------------- meta stands in for a GPU


@pytest.fixture(autouse=True)
def meta_as_gpu(monkeypatch):
    """Autocast and foreach answer for ``meta`` as for a GPU; asking for the fused CPU kernels is a stray."""
    _autocast_on_meta(monkeypatch)
    real_devices = foreach_utils._get_foreach_kernels_supported_devices
    monkeypatch.setattr(foreach_utils, "_get_foreach_kernels_supported_devices", lambda: [*real_devices(), "meta"])

    def no_fused_kernels():
        raise StrayTensorError(f"the fused CPU kernels were asked for at {where_in_our_code(sys._getframe(1))}")

    monkeypatch.setattr(lm.kernels, "fused", no_fused_kernels)


def _autocast_on_meta(monkeypatch) -> None:
    """torch.autocast, is_autocast_enabled and get_autocast_dtype keep a state for ``meta`` (a stack
    of (enabled, dtype), as torch keeps one per device type); other device types go to torch."""
    real_autocast, real_enabled, real_dtype = torch.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype
    stack = [(False, torch.float16)]  # off, with CUDA's default dtype

    @contextlib.contextmanager
    def meta_autocast(dtype: torch.dtype | None, enabled: bool):
        stack.append((enabled, dtype or stack[-1][1]))
        try:
            yield
        finally:
            stack.pop()

    def autocast(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, cache_enabled: bool | None = None):
        if device_type == "meta":
            return meta_autocast(dtype, enabled)
        return real_autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(
        torch, "is_autocast_enabled", lambda *device: stack[-1][0] if device == ("meta",) else real_enabled(*device)
    )
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: stack[-1][1] if device == "meta" else real_dtype(device))


# ---------------------------------------------------------------- models and data


OPTIONS = {
    "zaremba": dict(dropout=0.5, variant="zaremba"),
    "variational": dict(
        dropout=0.0, variant="variational", dropout_embedding=0.1, dropout_input=0.2, dropout_recurrent=0.3, dropout_output=0.4
    ),
    "recurrent": dict(dropout=0.5, variant="recurrent", dropout_recurrent=0.3),
    "none": dict(dropout=0.0, variant="none"),
    "weight_drop": dict(dropout=0.5, variant="zaremba", weight_drop=0.3),
    "tie_weights": dict(dropout=0.5, variant="zaremba", tie_weights=True),
}


def tiny_model(option: str) -> LanguageModel:
    """Two layers of 8 units, built on the host and moved to meta, as the commands do."""
    model = LanguageModel(VOCAB_SIZE, 8, 2, init_scale=0.1, **OPTIONS[option]).to(META)
    if OPTIONS[option].get("tie_weights"):  # a move to meta cannot keep a shared Parameter (one to a GPU does)
        model.decoder.weight = model.embedding.weight
    return model


def meta_ids(length: int) -> torch.Tensor:
    return torch.zeros(length, dtype=torch.int64, device=META)


def meta_corpus() -> Corpus:
    return Corpus(Vocab([f"w{i}" for i in range(VOCAB_SIZE)]), meta_ids(20), meta_ids(9), meta_ids(11))


# ---------------------------------------------------------------- the check itself


def test_another_device_never_asks_for_the_fused_kernels():
    """meta (a GPU's stand-in) gets the pure PyTorch paths without the kernels being built or loaded
    (the fixture makes asking a stray); the CPU does ask, so the check is not vacuous."""
    assert not lm.kernels.available("meta") and not lm.kernels.available(META)
    with pytest.raises(StrayTensorError, match="fused CPU kernels"):
        lm.kernels.available("cpu")


HOST_MATRIX = torch.ones(4, 2)  # made before the work: a weight left on the host
HOST_TOTAL = torch.zeros((), dtype=torch.float64)  # an accumulator left on the host


def _add_host_ones(x: torch.Tensor) -> torch.Tensor:
    return x + torch.ones(x.shape)


def _concatenate_host_zeros(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.zeros(1, 4)])


def _add_host_scalar_tensor(x: torch.Tensor) -> torch.Tensor:
    return x + torch.tensor(1.0)  # runs on a GPU too, but it is a missing device= all the same


def _multiply_by_host_matrix(x: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, HOST_MATRIX)  # PyTorch lets this pass on meta


def _accumulate_into_host_scalar(x: torch.Tensor) -> torch.Tensor:
    HOST_TOTAL.add_(x.sum())
    return HOST_TOTAL


def _copy_to_host(x: torch.Tensor) -> torch.Tensor:
    return x.cpu()


class _HostOnesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.ones(grad.shape)


def _stray_in_backward(x: torch.Tensor) -> torch.Tensor:
    x = x.requires_grad_()
    _HostOnesInBackward.apply(x).sum().backward()
    return x.grad


@pytest.mark.parametrize(
    "stray",
    [
        _add_host_ones,
        _concatenate_host_zeros,
        _add_host_scalar_tensor,
        _multiply_by_host_matrix,
        _accumulate_into_host_scalar,
        _copy_to_host,
        _stray_in_backward,
    ],
)
def test_a_stray_tensor_fails_the_check(stray: Callable[[torch.Tensor], torch.Tensor]):
    with pytest.raises(StrayTensorError, match=r"test_device_discipline\.py:\d+"):
        with DeviceDiscipline():
            stray(torch.ones(3, 4, device=META))


def test_a_missing_device_in_the_model_fails_evaluation(monkeypatch):
    def state_on_the_host(self, batch_size):
        return [(torch.zeros(1, batch_size, self.hidden_size),) * 2 for _ in range(self.num_layers)]

    monkeypatch.setattr(LanguageModel, "init_state", state_on_the_host)
    with pytest.raises(StrayTensorError, match=r"aten\.zeros\.default makes cpu \(1, 2, 8\) float32 on the host"):
        with DeviceDiscipline():
            evaluate_mixture([tiny_model("zaremba")], batchify(meta_ids(17), 2), 4)


def test_what_may_stay_on_the_host_passes():
    x, data = torch.ones(3, device=META), torch.ones(2, 3)
    with disciplined() as mode:
        assert (float(x.sum()), int(x.long().sum()), bool((x > 0).all())) == (1.0, -1, True)  # the stand-ins
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # a seed drawn from torch's CPU generator
        x = x * seed + data.to(META).sum(0)  # a 0-dim host tensor as a scalar; data moved to the device
    assert len(mode.syncs) == 3 and x.device == META


# ---------------------------------------------------------------- every entry point, every option


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.full
def test_training(option: str, precision: str):
    model = tiny_model(option)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, foreach=True)
    windows = bptt_windows(batchify(meta_ids(20), 2), 3)  # 3 windows
    dtype = torch.bfloat16 if precision == "bf16" else None
    with disciplined():  # every per-step option: a non-finite check and a log line at every step, weight decay
        train_epoch(
            model,
            windows,
            optimizer,
            5.0,
            autocast_dtype=dtype,
            weight_decay=0.01,
            skip_nonfinite=True,
            log_every=1,
            on_log=lambda *_: None,
        )
    with disciplined() as one_step:
        progress = train_epoch(model, windows, optimizer, 5.0, autocast_dtype=dtype, max_steps=1)
    with disciplined() as two_steps:  # from the carried state
        progress = train_epoch(model, windows, optimizer, 5.0, progress, autocast_dtype=dtype)
    assert progress.window == len(windows) and progress.skipped == 0
    assert all(p.device == META for p in model.parameters()) and progress.state[0][0].device == META
    assert len(one_step.syncs) == len(two_steps.syncs)  # host reads per call, none per step


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.full
def test_evaluation_monte_carlo_dropout_and_averaging(option: str):
    model, other = tiny_model(option), tiny_model(option)
    corpus = meta_corpus()
    with disciplined() as mode:
        plain = evaluate_all(model, corpus, batch_size=2, bptt=3, eval_window=4)
        monte_carlo = evaluate_all([model] * 3, corpus, batch_size=2, bptt=3, eval_window=4, stochastic=True)
        averaged = evaluate_all([model, other], corpus, batch_size=2, bptt=3, eval_window=4)
    for results in (plain, monte_carlo, averaged):
        assert {(split, p) for split, by_p in results.items() for p in by_p} == {
            ("valid", "batched"),
            ("valid", "stream"),
            ("test", "batched"),
            ("test", "stream"),
        }
    assert len(mode.syncs) == 3 * 4  # one host read per split and protocol, none per window


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("option", OPTIONS)
def test_generation(option: str, top_k: int | None):
    model = tiny_model(option)
    with disciplined() as mode:
        ids = sample(model, [1, 2, 3], words=4, temperature=0.8, top_k=top_k, seed=0)
    assert len(ids) == 4 and len(mode.syncs) == 4  # the word ids, one read per word


@pytest.mark.full
def test_model_averaging_command_runs_on_the_device_it_is_given(tmp_path: Path):
    corpus = write_corpus(tmp_path / "corpus", {"train": 30, "valid": 8, "test": 8})
    vocab = load_corpus(corpus).vocab
    cfg = train_config(
        tiny_overrides(
            corpus,
            "model.hidden_size=8",
            "model.dropout_variant=variational",
            "model.dropout=0",
            "model.dropout_input=0.2",
            "model.dropout_recurrent=0.3",
            "trainer.eval_window=6",
        )
    )
    checkpoints = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = LanguageModel.from_config(cfg.model, len(vocab))
        checkpoints.append(tmp_path / f"seed-{seed}" / "checkpoint.pt")
        save_checkpoint(
            checkpoints[-1],
            {
                "model": model.state_dict(),
                "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                "vocab": vocab.itos,
                "epoch": 1,
            },
        )
    with disciplined():  # loads and builds on the host, then moves the models: from there on, all is on meta
        report = run_ensemble(checkpoints, tmp_path / "ensemble", data_dir=str(corpus), device="meta")
    assert report["device"] == "meta" and len(report["members"]) == 2
