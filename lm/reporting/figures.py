"""The dropout pictures of results/figures/ (``make figures``), drawn from the real model.

- ``masks_over_time.png``: for each strategy, the masks the model draws in training on the
  connection layer 1 -> layer 2 and on layer 1's h_{t-1}, time steps by units, and beside them
  layer 1's hidden units h_t, over the first sentence of the validation split.
- ``placement.png``: for each dropout variant, which connections of a 2-layer LSTM unrolled over
  three steps carry a mask, and how the mask varies over time.

Both come from ``lm.reporting.mask_probe``, which runs ``LanguageModel`` in training mode and
reads the masks off the tensors, so a change to where the model drops changes the pictures (and
fails tests/test_figures.py, which holds the probe's findings to the paper's statement of each
variant). The strategies are the placements of ``make ablation`` (``configs/ablation/``), with
their rates. The hidden units need a trained model and none is committed, so one is trained here:
the paper's small recipe for its first 100 windows, in float64 on one thread so that its weights
are the same on every CPU (the project's ``train_step`` is fp32-only). Same inputs, same bytes:
figures at a fixed size and dpi, drawn off-screen with matplotlib's default style, no timestamps.
"""

from __future__ import annotations

import functools
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from lm.config import ModelConfig, TrainConfig, compose, validate
from lm.data.batching import batchify, bptt_windows
from lm.data.corpus import EOS, Corpus
from lm.infra.outputs import Output, atomic_write, atomic_write_text, claim, png_of_size, text_with
from lm.model.cells.state import map_state
from lm.model.language_model import LanguageModel
from lm.reporting.mask_probe import PER_SEQUENCE, PER_STEP, WEIGHTS, Connection, ProbeResult, node, one_thread, probe

MASKS_PNG = "masks_over_time.png"
PLACEMENT_PNG = "placement.png"
README = "README.md"
STRATEGIES = ("none", "zaremba", "recurrent", "variational")  # masks_over_time.png, left to right
PLACEMENTS = (*STRATEGIES, "variational_wd")  # placement.png
TITLES = {
    "none": "none",
    "zaremba": "zaremba (the paper's)",
    "recurrent": "recurrent",
    "variational": "variational",
    "variational_wd": "variational + weight drop",
}
RECIPE = "zaremba_small"  # the trained model's architecture, batching, lr and clip
# Windows of 20 x 20 tokens: 40,000 tokens, 4.3% of an epoch, about half a minute on one core. Not more: SGD at lr 1
# amplifies a difference in the last bit of a weight about tenfold every 25 steps (measured: 1e-16 grew to
# 3e-9 in 100 steps, 1e-6 in 150), and CPUs with other vector widths round some sums differently, so a
# longer run would end with weights, and pixels, that depend on the CPU.
TRAIN_STEPS = 100
REPORT_STEPS = 50  # the training perplexity reported is that of the last this many steps
SEED = 1
UNITS_SHOWN = 32  # of each layer's units, the first this many
HIDDEN_LIMIT = 0.6  # the hidden units' colour scale runs from -this to this (this model's units stay within it)
LEVELS = 9  # colour levels of the hidden units (odd: 0 sits mid-level), coarse enough not to show fp32 rounding
PROBE_VOCAB, PROBE_BATCH, PROBE_STEPS = 10, 4, 12  # placement.png's probe: random words, the model at its real size
STRIP_UNITS = 8  # units (or weights) per mask strip in placement.png
STYLE = {  # kind of mask -> colour, line style, legend text
    PER_STEP: ("#d62728", "-", "a fresh mask at every step"),
    PER_SEQUENCE: ("#1f77b4", "-", "one mask for the whole sequence"),
    WEIGHTS: ("#9467bd", "--", "DropConnect: W_hh entries dropped, one mask per window"),
}
UNMASKED = ("#9a9a9a", "-", "no mask")


@functools.cache
def placement_config(name: str) -> ModelConfig:
    """The model of ``make ablation``'s placement ``name`` (configs/ablation/<name>.yaml; read once)."""
    return validate(compose("train", ["experiment=ablation", f"ablation={name}"])).model


# ---------------------------------------------------------------- the trained model


@dataclass(frozen=True)
class BriefTraining:
    """The model behind the hidden units, and how far its training got."""

    model: LanguageModel  # fp32, the weights of the float64 training
    config: TrainConfig
    steps: int
    tokens: int
    split_tokens: int  # of the training split (an epoch)
    perplexity: float  # training perplexity of the last REPORT_STEPS steps (each before its update)
    unigram_perplexity: float  # of the same tokens under the training split's word frequencies


def train_briefly(corpus: Corpus, steps: int = TRAIN_STEPS, seed: int = SEED) -> BriefTraining:
    """The paper's small recipe (``RECIPE``) from ``seed`` for its first ``steps`` windows of the training
    split: the loss summed over a window and averaged over the batch, global norm clipping, SGD at the
    first epoch's lr, state carried between windows. Float64, so that after TRAIN_STEPS steps the weights
    do not depend on the CPU (see TRAIN_STEPS)."""
    cfg = validate(compose("train", [f"experiment={RECIPE}"]))
    windows = bptt_windows(batchify(corpus.train, cfg.data.batch_size), cfg.data.bptt)[:steps]
    counts = torch.bincount(corpus.train, minlength=len(corpus.vocab)).double()
    log_unigram = (counts / counts.sum()).log()
    nll = unigram_nll = 0.0
    tokens = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LanguageModel.from_config(cfg.model, len(corpus.vocab)).double().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
        state = model.init_state(cfg.data.batch_size)
        for index, (x, y) in enumerate(windows):
            state = map_state(torch.Tensor.detach, state)
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            optimizer.zero_grad()
            (loss / x.size(0)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            if index >= len(windows) - REPORT_STEPS:
                nll += float(loss.detach())
                unigram_nll -= float(log_unigram[y].sum())
                tokens += y.numel()
    return BriefTraining(
        model.float().eval(),
        cfg,
        len(windows),
        sum(y.numel() for _, y in windows),
        corpus.train.numel(),
        math.exp(nll / tokens),
        math.exp(unigram_nll / tokens),
    )


def first_sentence(corpus: Corpus) -> tuple[torch.Tensor, list[str]]:
    """The validation split's first line, ``<eos>`` included: ids [1, time] and its words."""
    eos = corpus.vocab[EOS]
    end = int((corpus.valid == eos).nonzero()[0]) + 1
    ids = corpus.valid[:end]
    return ids.unsqueeze(0), corpus.vocab.decode(ids)


def strategy_probes(trained: BriefTraining, ids: torch.Tensor, seed: int = SEED) -> dict[str, ProbeResult]:
    """The trained weights under each strategy's masks and rates, in training mode over ``ids``."""
    results = {}
    for name in STRATEGIES:
        with torch.random.fork_rng(devices=[]):  # its initial weights, replaced at once, draw from a copy
            model = LanguageModel.from_config(placement_config(name), trained.model.vocab_size)
        model.load_state_dict(trained.model.state_dict())
        results[name] = probe(model, ids, seed)
    return results


def probe_words(seed: int = SEED) -> torch.Tensor:
    """The random word ids [batch, time] that placement.png's probe reads (a small vocabulary, so words repeat)."""
    return torch.randint(0, PROBE_VOCAB, (PROBE_BATCH, PROBE_STEPS), generator=torch.Generator().manual_seed(seed))


def placement_probes(seed: int = SEED) -> dict[str, ProbeResult]:
    """Each placement's model (fresh weights from ``seed``) probed over ``probe_words``: where it masks."""
    results = {}
    for name in PLACEMENTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LanguageModel.from_config(placement_config(name), PROBE_VOCAB)
        results[name] = probe(model, probe_words(seed), seed)
    return results


# ---------------------------------------------------------------- drawing


def _pyplot():
    import matplotlib  # heavy: loaded only when a picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _save(fig, out: Path) -> None:
    _, plt = _pyplot()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100, metadata={"Software": None}))
    plt.close(fig)


def _unit_kept(result: ProbeResult, connection: Connection, units: int) -> torch.Tensor:
    """Row 0's kept units on ``connection``, [units, time] (all kept where it has no unit mask)."""
    steps = result.hidden[0].size(1)
    kept = torch.ones(steps, units, dtype=torch.bool)
    for mask in result.on(connection):
        if mask.kind != WEIGHTS:
            kept &= mask.kept[0, :, :units]
    return kept.T.float()


def hidden_shown(result: ProbeResult) -> torch.Tensor:
    """The hidden units drawn: layer 1's h(t) in batch row 1, its first UNITS_SHOWN units, [time, units]."""
    return result.hidden[0][0, :, :UNITS_SHOWN]


def level_margin(values: torch.Tensor) -> float:
    """How close any hidden value drawn comes to a boundary between two colour levels: a regeneration
    whose values differ by less than this (another CPU's rounding) draws the same pixels."""
    step = 2 * HIDDEN_LIMIT / LEVELS
    boundaries = torch.arange(1, LEVELS, dtype=torch.float64) * step - HIDDEN_LIMIT
    return float((values.double().reshape(-1, 1) - boundaries).abs().min())


def describe(result: ProbeResult) -> str:
    """Two lines: how many non-recurrent and recurrent connections carry a mask, and which kinds."""
    lines = []
    placement = result.placement()
    for recurrent in (False, True):
        group = [c for c in placement if c.recurrent == recurrent]
        masked = [c for c in group if placement[c]]
        kinds = sorted({k for c in group for k in placement[c]})
        text = f"{'recurrent' if recurrent else 'non-recurrent'}: {len(masked)} of {len(group)}"
        lines.append(text + (f" ({', '.join(kinds)})" if kinds else ""))
    if any(m.whole_steps for m in result.masks):
        lines[0] += ", whole words too"
    return "\n".join(lines)


def draw_masks_over_time(results: dict[str, ProbeResult], words: list[str], caption: str, out: Path) -> None:
    matplotlib, plt = _pyplot()
    vertical, recurrent = Connection("layer 1", "layer 2"), Connection("layer 1", "layer 1")
    rows = (
        f"mask on layer 1 → layer 2\n(unit, first {UNITS_SHOWN})",
        f"mask on h(t-1) → h(t), layer 1\n(unit, first {UNITS_SHOWN})",
        f"hidden units h(t) of layer 1\n(unit, first {UNITS_SHOWN})",
    )
    with matplotlib.style.context("default"):
        fig, axes = plt.subplots(3, len(results), figsize=(13, 9), dpi=100, sharex=True, sharey=True)
        fig.subplots_adjust(left=0.09, right=0.9, top=0.87, bottom=0.14, wspace=0.08, hspace=0.12)
        levels = plt.get_cmap("RdBu_r").resampled(LEVELS)
        for col, (name, result) in enumerate(results.items()):
            panels = (
                _unit_kept(result, vertical, UNITS_SHOWN),
                _unit_kept(result, recurrent, UNITS_SHOWN),
                hidden_shown(result).T,
            )
            for row, data in enumerate(panels):
                ax = axes[row, col]
                limit = HIDDEN_LIMIT if row == 2 else None
                style = dict(cmap=levels, vmin=-limit, vmax=limit) if limit else dict(cmap="gray", vmin=0, vmax=1)
                image = ax.imshow(data.numpy(), interpolation="nearest", aspect="auto", **style)
                if col == 0:
                    ax.set_ylabel(rows[row], fontsize=9)
            placement = result.placement()
            kinds = [", ".join(placement[c]) or "no mask" for c in (vertical, recurrent)]
            axes[0, col].set_title(f"{TITLES[name]}\n1 → 2: {kinds[0]}; h(t-1): {kinds[1]}", fontsize=9)
            axes[2, col].set_xticks(range(len(words)), words, rotation=90, fontsize=8)
        box = axes[2, -1].get_position()
        fig.colorbar(image, cax=fig.add_axes((box.x1 + 0.012, box.y0, 0.012, box.height)), label="h(t)")
        fig.text(box.x1 + 0.012, axes[0, -1].get_position().y0, "masks:\nblack: dropped\nwhite: kept", fontsize=9)
        fig.suptitle(caption, fontsize=10)
        _save(fig, out)


def _at(step: int, level: int) -> tuple[float, float]:
    """Where node (step, level) of the unrolled network is drawn; level 0 the input, L+1 the softmax."""
    return step * 2.4, level * 1.5


def _strip(ax, patches, centre: tuple[float, float], kept: torch.Tensor, colour: str) -> None:
    """A row of squares, black where the unit (or weight) is dropped."""
    size = 0.1
    x0 = centre[0] - size * len(kept) / 2
    for k, keep in enumerate(kept.tolist()):
        face = "white" if keep else "black"
        ax.add_patch(
            patches.Rectangle(
                (x0 + k * size, centre[1] - size / 2), size, size, facecolor=face, edgecolor=colour, lw=0.6, zorder=3
            )
        )


def _edge(ax, patches, start, end, masks, step: int) -> None:
    colour, line, _ = STYLE[masks[0].kind] if masks else UNMASKED
    width = 2.2 if masks else 1.0
    ax.annotate(
        "", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=colour, lw=width, linestyle=line, shrinkA=0, shrinkB=0)
    )
    centre = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
    for k, mask in enumerate(masks):
        kept = mask.kept[0, :STRIP_UNITS] if mask.kind == WEIGHTS else mask.kept[0, step, :STRIP_UNITS]
        _strip(ax, patches, (centre[0], centre[1] + 0.16 * k), kept, STYLE[mask.kind][0])


def _draw_network(ax, patches, result: ProbeResult, steps: int = 3) -> None:
    L = result.num_layers
    width, height = 0.8, 0.45
    names = ["x"] + [f"h^{layer}" for layer in range(1, L + 1)] + [r"\hat{y}"]
    placement_masks = {c: result.on(c) for c in result.placement()}
    for step in range(steps):
        for level in range(L + 2):
            x, y = _at(step, level)
            box = patches.FancyBboxPatch(
                (x - width / 2, y - height / 2),
                width,
                height,
                boxstyle="round,pad=0.02",
                facecolor="#f4f4f4",
                edgecolor="black",
                lw=0.8,
                zorder=2,
            )
            ax.add_patch(box)
            ax.text(x, y, f"${names[level]}_{step + 1}$", ha="center", va="center", fontsize=10, zorder=4)
            if level <= L:  # up to the next level
                connection = Connection(node(level, L), node(level + 1, L))
                _edge(
                    ax, patches, (x, y + height / 2), (x, _at(step, level + 1)[1] - height / 2), placement_masks[connection], step
                )
            if 1 <= level <= L:  # from the previous step (the first from h_0)
                connection = Connection(node(level, L), node(level, L))
                start_x = _at(step - 1, level)[0] + width / 2 if step else x - width / 2 - 1.2
                if not step:
                    ax.text(start_x - 0.05, y, f"$h^{level}_0$", ha="right", va="center", fontsize=9)
                _edge(ax, patches, (start_x, y), (x - width / 2, y), placement_masks[connection], step)
    ax.set_xlim(-2.2, _at(steps - 1, 0)[0] + 0.7)
    ax.set_ylim(-0.5, _at(0, L + 1)[1] + 0.5)
    ax.set_aspect("equal")
    ax.axis("off")


def draw_placement(results: dict[str, ProbeResult], out: Path) -> None:
    matplotlib, plt = _pyplot()
    from matplotlib import lines, patches

    with matplotlib.style.context("default"):
        columns = 3
        rows = (len(results) + 1 + columns - 1) // columns
        fig, axes = plt.subplots(rows, columns, figsize=(13, 4.4 * rows), dpi=100)
        fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.03, wspace=0.05, hspace=0.25)
        flat = axes.ravel().tolist()
        for ax, (name, result) in zip(flat, results.items()):
            _draw_network(ax, patches, result)
            ax.set_title(f"{TITLES[name]}\n{describe(result)}", fontsize=9)
        legend_ax = flat[len(results)]
        legend_ax.axis("off")
        handles = [
            lines.Line2D([], [], color=c, linestyle=s, lw=2.2 if k in STYLE else 1.0, label=t)
            for k, (c, s, t) in [*STYLE.items(), ("", UNMASKED)]
        ]
        handles += [
            patches.Patch(facecolor="black", edgecolor="black", label="dropped unit (or weight)"),
            patches.Patch(facecolor="white", edgecolor="black", label="kept unit (or weight)"),
        ]
        legend_ax.legend(
            handles=handles,
            loc="center",
            fontsize=9,
            frameon=False,
            title=f"squares: the first {STRIP_UNITS} units of\nbatch row 1 at that step, as drawn",
            title_fontsize=9,
        )
        for ax in flat[len(results) + 1 :]:
            ax.axis("off")
        fig.suptitle(
            "Where each dropout variant masks: a 2-layer LSTM unrolled over 3 steps, the masks found by running the model\n"
            "(lm/reporting/mask_probe.py; the placements and rates of configs/ablation/)",
            fontsize=10,
        )
        _save(fig, out)


# ---------------------------------------------------------------- the command's work


def rates_shown() -> str:
    """The drop probabilities of the strategies drawn, as the caption says them."""
    rates = set()
    for name in PLACEMENTS:
        cfg = placement_config(name)
        rates |= {
            getattr(cfg, key)
            for key in ("dropout", "dropout_embedding", "dropout_input", "dropout_recurrent", "dropout_output", "weight_drop")
        }
    rates.discard(0.0)
    return " / ".join(f"{p:g}" for p in sorted(rates))


def make_figures(corpus: Corpus, out: Path, steps: int = TRAIN_STEPS, seed: int = SEED) -> str:
    """Write both pictures and their README into ``out`` (on one thread: the same bytes however many
    cores); returns a summary for the terminal. A file there that it did not write is refused first."""
    claim(
        [
            Output(out / README, "--out", "a README.md that make figures generated", text_with("Generated by `make figures`")),
            *(
                Output(out / name, "--out", f"a {name} that make figures drew", png_of_size(1300, None))
                for name in (MASKS_PNG, PLACEMENT_PNG)
            ),
        ]
    )
    with one_thread():
        trained = train_briefly(corpus, steps, seed)
        ids, words = first_sentence(corpus)
        p = rates_shown()
        caption = (
            f"Dropout masks as LanguageModel draws them in training (seed {seed}; p = {p} at every place), and the hidden "
            f"units of layer 1\nof the paper's small LSTM after {trained.steps} training windows, over the first "
            f"validation sentence (batch row 1; black: dropped, white: kept)"
        )
        strategies = strategy_probes(trained, ids, seed)
        margin = level_margin(torch.stack([hidden_shown(r) for r in strategies.values()]))
        draw_masks_over_time(strategies, words, caption, out / MASKS_PNG)
        draw_placement(placement_probes(seed), out / PLACEMENT_PNG)
        atomic_write_text(out / README, readme(trained, words, seed, p, margin))
    return (
        f"wrote {out / MASKS_PNG}, {out / PLACEMENT_PNG} and {out / README}; the model: {trained.steps} windows, "
        f"training perplexity {trained.perplexity:.1f} (unigram {trained.unigram_perplexity:.1f}); the hidden "
        f"values drawn come within {margin:.1e} of a colour-level boundary"
    )


def readme(trained: BriefTraining, words: list[str], seed: int, rates: str, margin: float) -> str:
    """results/figures/README.md: what each picture shows and how it was made (paragraphs wrapped at 100)."""
    cfg, m = trained.config, trained.config.model
    worse = trained.perplexity > trained.unigram_perplexity
    blocks = [
        "# Dropout, pictured from the model's own code",
        "Generated by `make figures` (`python -m lm.figures`; the code: `lm/reporting/figures.py` and "
        "`lm/reporting/mask_probe.py`): do not edit. `tests/test_figures.py` regenerates these files and compares "
        "their bytes with the committed ones.",
        f"## {MASKS_PNG}",
        f"![masks over time]({MASKS_PNG})",
        "One column per dropout strategy: the placements of `make ablation` (`configs/ablation/`), with their "
        f"rates (p = {rates} at every place). Time steps across (the words of the sentence); the first "
        f"{UNITS_SHOWN} of {m.hidden_size} units down. The rows:",
        "1. the mask on the connection from layer 1 to layer 2 (black: dropped, white: kept);\n"
        "2. the mask on layer 1's h(t-1) at each step t, as the model hands it to its time loop;\n"
        f"3. layer 1's hidden units h(t), in {LEVELS} colour levels from -{HIDDEN_LIMIT:g} to {HIDDEN_LIMIT:g}.",
        f"All three come from one forward pass in training mode (torch seeded with {seed}, batch row 1) over the "
        f'first line of the validation split, {len(words)} tokens: "{" ".join(words)}". The masks are read off the '
        "tensors by the probe, not drawn again: `zaremba` draws a fresh mask at every step (speckles), "
        "`variational` one for the whole sequence (stripes), `recurrent` the zaremba masks and a fresh one on "
        "h(t-1). On CPU the fresh masks come from the fused kernels' hash, or from torch's generator where those "
        "kernels cannot be built (then the speckles differ).",
        "The model: no checkpoint is committed, so `make figures` trains one, the paper's small non-regularized "
        f"LSTM (`experiment={RECIPE}`: {m.num_layers} layers of {m.hidden_size} units, a vocabulary of "
        f"{trained.model.vocab_size:,} words, every parameter U(-{m.init_scale:g}, {m.init_scale:g}), batch "
        f"{cfg.data.batch_size}, BPTT {cfg.data.bptt}, SGD at lr {cfg.optim.lr:g}, clip {cfg.optim.max_grad_norm:g}), "
        f"from seed {seed} on the first {trained.steps} windows of the training split ({trained.tokens:,} tokens, "
        f"{100 * trained.tokens / trained.split_tokens:.1f}% of an epoch), in float64 on one thread. Its training "
        f"perplexity over its last {min(REPORT_STEPS, trained.steps)} windows is {trained.perplexity:.1f}, against "
        f"{trained.unigram_perplexity:.1f} for the training split's word frequencies alone on the same tokens: a "
        f"briefly trained model, {'not yet as good as' if worse else 'better than'} "
        "word frequencies alone, and far from the paper's. Each strategy runs these weights in fp32 (the masked "
        "time loop has no float64 path) with its own masks.",
        "Why so brief: SGD at lr 1 amplifies a difference in the last bit of a weight about tenfold every 25 "
        "steps, and CPUs of other vector widths round some sums differently, so a longer run would end with "
        "weights, and pixels, that depend on the CPU (measured: a last-bit difference grew to about 3e-9 in 100 "
        "steps, 1e-6 in 150). The weights of 100 steps agree to about 1e-9 between CPUs and the fp32 forward to "
        f"about 1e-7, while no hidden value drawn here comes closer than {margin:.0e} to a boundary between two "
        "colour levels: another CPU draws the same pixels.",
        f"## {PLACEMENT_PNG}",
        f"![placement of the masks]({PLACEMENT_PNG})",
        "For each dropout variant (`variational_wd`: variational with DropConnect on the recurrent weights in "
        f"place of the mask on h(t-1)), a {m.num_layers}-layer LSTM unrolled over 3 steps: which connections carry "
        "a mask (input -> layer 1, layer 1 -> layer 2, layer 2 -> softmax, and h(t-1) -> h(t) in each layer) and "
        "how it varies over time. Not drawn from a list: the probe runs each placement's model (fresh weights "
        f"from seed {seed}, {PROBE_BATCH} rows of {PROBE_STEPS} random words) in training mode and finds every "
        "mask from the tensors at the modules' boundaries, the mask the model hands its time loop, and the "
        f"weights its parametrizations return. The squares on a connection are the first {STRIP_UNITS} units of "
        "batch row 1 at that step (of W_hh's first row, for DropConnect).",
        "`tests/test_figures.py` holds the probe's findings to the paper's statement of each variant (zaremba: "
        "the L+1 non-recurrent connections, a fresh mask at every step, never h(t-1); variational: every "
        "connection, h(t-1) included, one mask per sequence; recurrent: zaremba's and a fresh mask on h(t-1) at "
        "every step; none: nothing), so a change to where the model drops changes this picture and fails that test.",
    ]
    return "\n\n".join(_wrap(block) for block in blocks) + "\n"


def _wrap(block: str) -> str:
    """A paragraph or numbered list wrapped at 100 characters; headings and images as they are."""
    if block.startswith(("#", "![")):
        return block
    return "\n".join(
        textwrap.fill(
            line, 100, break_on_hyphens=False, break_long_words=False, subsequent_indent="   " if line[:1].isdigit() else ""
        )
        for line in block.split("\n")
    )
