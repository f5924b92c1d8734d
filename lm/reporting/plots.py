"""Perplexity-per-epoch plots, drawn off-screen and written atomically (same inputs, same bytes)."""

from __future__ import annotations

from pathlib import Path

from lm.infra.outputs import atomic_write, png_of_size
from lm.reporting.paper import PAPER_TABLE_1
from lm.reporting.results import ResultFile, paper_experiment

CURVE_NAME = "curve.png"
DPI = 100
CURVE_SIZE = (6, 4)  # inches: a curve.png is 600 x 400 pixels, which is how the report knows one of its own
# Whether a file is a plot these functions drew (at ``size`` inches): a PNG of that many pixels.
drawn_at = lambda size: png_of_size(size[0] * DPI, size[1] * DPI)  # noqa: E731


def new_figure(figsize: tuple[float, float]):
    """A (fig, ax) pair drawn off-screen (no display needed)."""
    import matplotlib  # heavy: loaded only when a plot is drawn (--no-plots and the tables do without)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=DPI)


def save_epoch_plot(fig, ax, title: str, ylabel: str, out: Path) -> None:
    """Perplexity per epoch on a log axis, written atomically as PNG (same inputs, same bytes)."""
    import matplotlib.pyplot as plt  # heavy: see new_figure

    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))
    plt.close(fig)


def plot_curve(run: ResultFile, out: Path) -> None:
    epochs = run.metrics["epochs"]
    xs = [e["epoch"] for e in epochs]
    fig, ax = new_figure(CURVE_SIZE)
    ax.plot(xs, [e["train_ppl"] for e in epochs], marker="o", label="train")
    ax.plot(xs, [e["valid_ppl"] for e in epochs], marker="o", label="valid")
    paper = PAPER_TABLE_1.get(paper_experiment(run) or "")
    if paper:
        ax.axhline(paper[1], color="gray", linestyle="--", linewidth=1, label=f"paper valid {paper[1]}")
    save_epoch_plot(fig, ax, f"{run.name} (seed {run.metrics['seed']})", "perplexity", out)
