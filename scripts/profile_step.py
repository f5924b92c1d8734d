"""Where one training step's time goes, by category, at the paper's sizes: ``make profile``.

For each recipe (``experiment=zaremba_{small,medium,large}``) and precision, the trainer's own
step (``lm.engine.step.train_epoch``) runs on random windows of the recipe's shapes: first timed
alone (the step's wall time), then under ``torch.profiler``. Every op's own time is charged to
a category by its name and the region it ran in (an ``mm`` inside the fused LSTM is a product,
a ``copy_`` there is gate work). What the ops do not account for, against the unprofiled wall
time, is Python and dispatch overhead. Writes ``results/profile/README.md`` and
``profile.json`` with the CPU model and its bf16 instructions. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm import kernels  # noqa: E402
from lm.config import compose, validate  # noqa: E402
from lm.data.batching import batchify, bptt_windows  # noqa: E402
from lm.engine.step import train_epoch  # noqa: E402
from lm.infra.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from lm.model.language_model import LanguageModel  # noqa: E402

VOCAB = 10_000
CATEGORIES = (
    "products",
    "oneDNN LSTM layer (products and gates)",
    "gate arithmetic",
    "loss (softmax)",
    "dropout",
    "casts and weight layouts",
    "clipping",
    "optimizer (SGD)",
    "embedding",
    "allocation and zeroing",
    "other ops",
    "Python and dispatch",
)
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"}
CASTS = {"aten::copy_", "aten::_to_copy", "aten::to", "mkldnn::_reorder_linear_weight"}
ALLOCATION = {
    "aten::empty",
    "aten::empty_like",
    "aten::zeros",
    "aten::zeros_like",
    "aten::fill_",
    "aten::zero_",
    "aten::empty_strided",
    "aten::resize_",
}
CLIPPING = {"aten::_foreach_norm", "aten::linalg_vector_norm", "aten::stack", "aten::isfinite"}
REGIONS = (  # a marker in the op's or an enclosing region's name -> category
    ("LSTMWindow", "gate arithmetic"),
    ("LinearNLL", "loss (softmax)"),
    ("log_softmax", "loss (softmax)"),
    ("nll_loss", "loss (softmax)"),
    ("HashDropout", "dropout"),
    ("Optimizer.step", "optimizer (SGD)"),
    ("WeightCopies.step", "optimizer (SGD)"),  # SGD on the weights with bf16 copies, the copies rewritten
    ("embedding", "embedding"),
)
DROPOUT_OPS = {
    "aten::uniform_",
    "aten::bernoulli_",
    "aten::lt",
    "aten::div_",
    "aten::native_dropout",
    "aten::native_dropout_backward",
}


def recipe_shapes(size: str) -> dict:
    """The recipe's shapes, read from its preset (the configs hold every size, nowhere else)."""
    cfg = validate(compose("train", [f"experiment=zaremba_{size}"]))
    m = cfg.model
    return {
        "hidden": m.hidden_size,
        "layers": m.num_layers,
        "dropout": m.dropout,
        "init": m.init_scale,
        "batch": cfg.data.batch_size,
        "bptt": cfg.data.bptt,
        "max_grad_norm": cfg.optim.max_grad_norm,
    }


def categorize(event) -> str:
    name = event.name
    if name in PRODUCTS:
        return "products"
    if name.startswith("aten::mkldnn_rnn_layer"):
        return "oneDNN LSTM layer (products and gates)"
    if name in CASTS:
        return "casts and weight layouts"
    node = event
    while node is not None:
        for marker, category in REGIONS:
            if marker in node.name:
                return category
        node = node.cpu_parent
    if name in DROPOUT_OPS:
        return "dropout"
    if name in CLIPPING:
        return "clipping"
    if name in CASTS:
        return "casts and weight layouts"
    if name in ALLOCATION:
        return "allocation and zeroing"
    return "other ops"


def profile_recipe(size: str, precision: str, steps: int) -> dict:
    shape = recipe_shapes(size)
    torch.manual_seed(0)
    batch, bptt = shape["batch"], shape["bptt"]
    stream = torch.randint(0, VOCAB, (batch * (bptt * (steps + 2) + 1),))
    windows = bptt_windows(batchify(stream, batch), bptt)[:steps]
    model = LanguageModel(VOCAB, shape["hidden"], shape["layers"], shape["dropout"], shape["init"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, foreach=True)
    autocast = torch.bfloat16 if precision == "bf16" else None

    def run() -> float:
        return train_epoch(model, windows, optimizer, shape["max_grad_norm"], autocast_dtype=autocast).seconds

    run()  # warm-up (and the kernels' build, once)
    wall = min(run() for _ in range(3)) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    seconds = defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CPU" and event.self_cpu_time_total > 0:
            seconds[categorize(event)] += event.self_cpu_time_total / 1e6 / steps
    ops = sum(seconds.values())
    # the profiler slows ops a little: shares are of the ops' total, scaled to the unprofiled wall time
    scale = min(1.0, wall / ops) if ops else 1.0
    per_step = {c: seconds.get(c, 0.0) * scale for c in CATEGORIES[:-1]}
    per_step["Python and dispatch"] = max(wall - sum(per_step.values()), 0.0)
    products = per_step["products"] + per_step["oneDNN LSTM layer (products and gates)"]
    return {
        "size": size,
        "precision": precision,
        "step_ms": wall * 1e3,
        "tokens_per_s": batch * bptt / wall,
        "ms": {c: v * 1e3 for c, v in per_step.items()},
        "products_share": products / wall,
        "shape": shape,
    }


def markdown(results: list[dict], cpu: dict, threads: int) -> str:
    lines = [
        "# Where a training step's time goes",
        "",
        f"CPU: {cpu['model']}, bf16 instructions: {cpu['bf16']}; {threads} threads; torch {torch.__version__}; "
        f"fused kernels: {'yes' if kernels.available('cpu') else 'no (pure-PyTorch fallback)'}.",
        "Generated by `make profile` (`scripts/profile_step.py`); do not edit by hand.",
        "",
        "Milliseconds per step (one BPTT window of the recipe's batch) and share of the step, by category. "
        "Products are matrix multiplications wherever they run (the fp32 zaremba layers run oneDNN's fused "
        "LSTM, whose products and gates cannot be told apart). Python and dispatch is the wall time the "
        "ops do not account for.",
        "",
        "| category | " + " | ".join(f"{r['size']} {r['precision']}" for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for c in CATEGORIES:
        cells = [f"{r['ms'][c]:.1f} ({r['ms'][c] / r['step_ms']:.0%})" for r in results]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **step** | " + " | ".join(f"**{r['step_ms']:.1f}**" for r in results) + " |")
    lines.append("| tokens/s | " + " | ".join(f"{r['tokens_per_s']:,.0f}" for r in results) + " |")
    lines.append("| products' share | " + " | ".join(f"{r['products_share']:.0%}" for r in results) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["small", "medium", "large"], choices=["small", "medium", "large"])
    parser.add_argument(
        "--precisions",
        nargs="*",
        default=None,
        choices=["fp32", "bf16"],
        help="default fp32 and bf16; fp32 alone where the CPU has no bf16 instructions (emulated)",
    )
    parser.add_argument("--steps", type=int, default=10, help="windows per timing (large uses a third)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="results/profile", help="folder for README.md and profile.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the work: an unwritable place fails now
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = kernels.cpu_info()
    precisions = args.precisions
    if precisions is None:
        precisions = ["fp32", "bf16"] if cpu["bf16"] != "none" else ["fp32"]
        if cpu["bf16"] == "none":
            print("bf16 is emulated on this CPU (no bf16 instructions): profiling fp32 only (--precisions bf16 forces it)")
    results = []
    for size in args.sizes:
        for precision in precisions:
            steps = max(2, args.steps // 3) if size == "large" else args.steps
            r = profile_recipe(size, precision, steps)
            print(
                f"{size} {precision}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
                f"products {r['products_share']:.0%}",
                flush=True,
            )
            results.append(r)
    text = markdown(results, cpu, torch.get_num_threads())
    atomic_write_text(out / "README.md", text)
    atomic_write_json(
        out / "profile.json",
        {"cpu": cpu, "threads": torch.get_num_threads(), "torch_version": torch.__version__, "results": results},
    )
    print(text)
    print(f"wrote {out / 'README.md'} and {out / 'profile.json'}")


if __name__ == "__main__":
    main()
