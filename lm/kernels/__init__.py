"""The fused CPU kernels of the training step (``lm/kernels/csrc/fused.cpp``), compiled on first use.

Why compiled: between the matrix products, an LSTM step is a dozen small element-wise
ops that PyTorch launches one by one from Python, and the loss writes the logits in fp32
three times over; on a 2-core CPU that work took as long as the products themselves.
The kernels do it in one pass each (see the C++ file's header).

Built once per source, torch version and CPU (``-march=native``) with
``torch.utils.cpp_extension`` into torch's extension cache, and reused after. Where it
cannot be built (no compiler, no headers), ``fused()`` returns None after one warning
line and the callers run the pure-PyTorch path with the same math. ``LM_FUSED=0``
forces that path.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("lm.kernels")

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused.cpp"
DISABLE_ENV = "LM_FUSED"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def _cpu_flags() -> str:
    """The CPU's feature flags (the build uses -march=native, so a build is only valid on its CPU kind)."""
    return _cpuinfo_field("flags") or _cpuinfo_field("Features") or platform.machine() + platform.processor()


def _cpuinfo_field(prefix: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_info() -> dict[str, str]:
    """The CPU model and its bf16 instructions: what every timing must be read against (AMX makes
    bf16 products about five times cheaper than AVX512-BF16 alone; without either, bf16 is emulated)."""
    flags = set(_cpu_flags().split())
    bf16 = (
        "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "Arm BF16" if "bf16" in flags else "none"
    )
    model = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    family, number = _cpuinfo_field("cpu family"), _cpuinfo_field("model\t")
    if family and number:  # a VM may name only the vendor line ("AMD EPYC"): family/model tell the generation
        model += f" (family {family}, model {number})"
    return {"model": model, "bf16": bf16}


def build_name() -> str:
    """One extension name per source, flags, torch version and install, and CPU: a change to any
    rebuilds. The install's folder is part of it because the build file names torch's headers there:
    two environments sharing one extension folder would otherwise rebuild each other's on every run."""
    key = "\n".join([SOURCE.read_text(), " ".join(CFLAGS), torch.__version__, str(Path(torch.__file__).parent), _cpu_flags()])
    return "lm_fused_" + hashlib.sha256(key.encode()).hexdigest()[:16]


_unavailable: list[str] = []  # why fused() returned None in this process, once it has


@functools.cache
def fused() -> ModuleType | None:
    """The compiled kernels, or None (one warning, once per process) where they cannot be built."""
    _unavailable.clear()
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _unavailable.append(f"{DISABLE_ENV}=0")
        return None
    try:
        import torch.utils.cpp_extension as cpp_extension  # heavy (setuptools); only needed to build

        name = build_name()
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / "lm.lock", "w") as lock:
            # Our lock goes with the process however it ends. torch's own lock is a file ("lock")
            # that a process killed while loading leaves behind, after which every later load
            # would wait for it forever; while we hold ours, no live process of ours holds torch's.
            fcntl.flock(lock, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return cpp_extension.load(
                name=name,
                sources=[str(source_copy(build_dir))],
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as err:  # no compiler, no headers, a failed build: all mean the same to the caller
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("fused CPU kernels unavailable (%s); training runs the slower pure-PyTorch path", reason[:200])
        _unavailable.append(reason[:200])
        return None


def source_copy(build_dir: Path) -> Path:
    """The source as a file inside its build folder, written once. The build file names its source by
    path, so building from each checkout's own file would rebuild the same source for every checkout
    (a clone for a long run, a CI check) and replace the library under the runs of the others."""
    copy = build_dir / SOURCE.name
    text = SOURCE.read_text()
    if not copy.is_file() or copy.read_text() != text:
        partial = copy.with_name(copy.name + ".partial")
        partial.write_text(text)
        os.replace(partial, copy)
    return copy


def build_root() -> Path:
    """Where builds go: torch's extension folder (``$TORCH_EXTENSIONS_DIR``, else ~/.cache/torch_extensions)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels run for tensors on ``device`` (CPU only)."""
    return torch.device(device).type == "cpu" and fused() is not None


FUSED, PYTORCH = "fused", "pytorch"


def path(device: torch.device | str, quiet: bool = False) -> str:
    """Which kernels train on ``device``: ``fused`` (this module's) or ``pytorch``. Recorded with every
    run: the two draw other dropout masks, so the same seed and config give other numbers on each.
    ``quiet``: without the build's warning line (a check before the command's logging is set up;
    the trainer says it later, with the reason, ``why_not_fused``)."""
    if not quiet:
        return FUSED if available(device) else PYTORCH
    disabled, log.disabled = log.disabled, True
    try:
        return FUSED if available(device) else PYTORCH
    finally:
        log.disabled = disabled


def why_not_fused() -> str | None:
    """Why the fused kernels are not used in this process (``LM_FUSED=0``, a failed build), if they are not."""
    fused()
    return _unavailable[0] if _unavailable else None
