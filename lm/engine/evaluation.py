"""Perplexity under the two evaluation protocols, and the evaluation of a saved checkpoint
(``python -m lm.evaluate``).

- batched: the split cut into ``batch_size`` streams and ``bptt`` windows with
  the state carried (what the paper's code does for validation every epoch);
- stream (the paper's test protocol): one continuous stream, batch 1, state
  carried over the whole split, every token after the first predicted. Feeding
  the stream in long windows is the same computation as one token at a time
  (dropout is off and the state is carried), only much faster.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lm.config import ConfigError, check_mc_fits, validate_eval, validate_saved
from lm.data.batching import batchify, bptt_windows
from lm.data.corpora import layout_in
from lm.data.corpus import Corpus
from lm.engine.runtime import (
    build_model_from_checkpoint,
    fp32_products,
    load_user_data,
    precision_record,
    provenance,
    select_device,
)
from lm.infra.checkpoint import CHECKPOINT_NAME, load_checkpoint
from lm.infra.outputs import Output, atomic_write_json, claim, json_of
from lm.infra.schema import EVAL
from lm.model.language_model import LanguageModel

log = logging.getLogger(__name__)

PROTOCOLS = ("batched", "stream")
PROTOCOL_DESCRIPTIONS = {
    "batched": "batched streams and BPTT windows, state carried",
    "stream": "paper: one stream, batch 1, state carried, every token after the first predicted",
}


def perplexity(nll_sum: float, tokens: int) -> float:
    """Token-weighted perplexity: exp(total negative log-likelihood / tokens predicted)."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:  # a mean NLL above ~709 nats: infinite, which the trainer treats as a numerical fault
        return math.inf


@torch.no_grad()
def evaluate_mixture(
    models: Sequence[LanguageModel], data: torch.Tensor, window: int, stochastic: bool = False
) -> tuple[float, int]:
    """Summed NLL (nats) and number of predictions of the models' averaged probabilities.

    Each member carries its own state (starting at zero) over ``data`` [streams, n];
    the mixture predicts mean_k p_k(word): the paper's model averaging, or, with
    ``stochastic`` (dropout left on) and one model listed K times, Monte Carlo
    dropout. With one deterministic member this is plain evaluation.
    """
    if stochastic and len(models) > 1 and all(m is models[0] for m in models):
        return evaluate_mc_batched(models[0], data, window, len(models))
    modes = [m.training for m in models]
    for m in models:
        m.train(stochastic)
    device = next(models[0].parameters()).device
    states = [m.init_state(data.size(0)) for m in models]
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    log_k = math.log(len(models))
    # the split goes to the device once: a copy per window from pageable memory would make
    # the host wait for the GPU at every window
    for x, y in bptt_windows(data.to(device), window):
        if len(models) == 1:  # plain evaluation: the loss the trainer reports
            logits, states[0] = models[0](x, states[0])
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum").double()
        else:
            target_logp = []
            for i, m in enumerate(models):
                logits, states[i] = m(x, states[i])
                logp = F.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
                target_logp.append(logp.double())
            nll -= (torch.logsumexp(torch.stack(target_logp), dim=0) - log_k).sum()
        count += y.numel()
    for m, mode in zip(models, modes):
        m.train(mode)
    return float(nll), count


@torch.no_grad()
def evaluate_mc_batched(model: LanguageModel, data: torch.Tensor, window: int, samples: int) -> tuple[float, int]:
    """Monte Carlo dropout in one pass: the streams repeated ``samples`` times along the batch
    (row k * streams + r is sample k of stream r), dropout on, so each row draws its own masks; per
    token the samples' probabilities are averaged. The same mixture as ``samples`` passes one after
    another (tested with the same masks), at batch ``samples`` instead of 1 under the paper's protocol."""
    mode = model.training
    model.train(True)
    streams = data.size(0)
    tiled = data.to(next(model.parameters()).device).repeat(samples, 1)
    state = model.init_state(tiled.size(0))
    nll = torch.zeros((), dtype=torch.float64, device=tiled.device)
    count = 0
    for x, y in bptt_windows(tiled, window):
        logits, state = model(x, state)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # [samples * streams, T]
        per_sample = logp.double().view(samples, streams, -1)
        nll -= (torch.logsumexp(per_sample, dim=0) - math.log(samples)).sum()
        count += y[:streams].numel()
    model.train(mode)
    return float(nll), count


def evaluate_mc(
    model: LanguageModel, data: torch.Tensor, window: int, samples: int, stochastic: bool = True
) -> tuple[float, int]:
    """Monte Carlo dropout: probabilities averaged over ``samples`` passes with dropout on."""
    return evaluate_mixture([model] * samples, data, window, stochastic=stochastic)


def evaluate(model: LanguageModel, data: torch.Tensor, window: int) -> tuple[float, int]:
    """Summed NLL (nats) and number of predictions over ``data`` [streams, n]; state starts at zero."""
    return evaluate_mixture([model], data, window)


def evaluate_split(
    models: Sequence[LanguageModel],
    ids: torch.Tensor,
    protocol: str,
    batch_size: int,
    bptt: int,
    eval_window: int,
    stochastic: bool = False,
) -> dict[str, float]:
    """Perplexity of one split under one protocol, with the counts behind it."""
    if protocol == "batched":
        nll, count = evaluate_mixture(models, batchify(ids, batch_size), bptt, stochastic)
    elif protocol == "stream":
        nll, count = evaluate_mixture(models, batchify(ids, 1), eval_window, stochastic)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    return {"ppl": perplexity(nll, count), "nll": nll, "tokens": count}


def evaluate_all(
    models: LanguageModel | Sequence[LanguageModel],
    corpus: Corpus,
    batch_size: int,
    bptt: int,
    eval_window: int,
    stochastic: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {protocol: {ppl, nll, tokens}}} for valid and test under both protocols (one model or an average)."""
    if isinstance(models, LanguageModel):
        models = [models]
    return {
        split: {p: evaluate_split(models, corpus.split(split), p, batch_size, bptt, eval_window, stochastic) for p in PROTOCOLS}
        for split in ("valid", "test")
    }


def format_results(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'split':<6} {'protocol':<8} {'perplexity':>10} {'predictions':>12}"]
    for split, by_protocol in results.items():
        for protocol, r in by_protocol.items():
            lines.append(f"{split:<6} {protocol:<8} {r['ppl']:>10.2f} {r['tokens']:>12,}")
    return "\n".join(lines)


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Load a checkpoint, evaluate it under both protocols, print and write JSON.

    The data comes from ``data_dir`` (or ``$LM_DATA_DIR``, or data/ptb for a PTB checkpoint), never
    from the checkpoint's saved config, and is never downloaded here: a checkpoint is untrusted."""
    ecfg = validate_eval(cfg)
    ckpt_path = Path(ecfg.checkpoint)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / CHECKPOINT_NAME
    output = Path(ecfg.output) if ecfg.output else ckpt_path.with_name("eval.json")
    inputs = {ckpt_path: "the checkpoint it evaluates"}
    if ecfg.data_dir is not None and Path(ecfg.data_dir).is_dir():
        folder = Path(ecfg.data_dir)
        inputs.update({file: "a file of the corpus it reads" for file in layout_in(folder).files(folder).values()})
    claim([Output(output, "output", "an eval.json written by lm.evaluate", json_of(EVAL))], inputs, ConfigError)
    ckpt = load_checkpoint(ckpt_path)
    train_cfg = validate_saved(ckpt["config"])
    device = select_device(ecfg.device, "device")
    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)
    corpus = load_user_data(ecfg.data_dir, train_cfg)
    model = build_model_from_checkpoint(ckpt, corpus.vocab)
    model.to(device)
    batch_size = ecfg.batch_size or train_cfg.data.batch_size
    bptt = ecfg.bptt or train_cfg.data.bptt
    eval_window = ecfg.eval_window or train_cfg.trainer.eval_window
    for split in ("valid", "test"):  # before the work: a split too short for the batch size
        batchify(corpus.split(split), batch_size)
    if ecfg.eval.mc_samples:  # before the work too: samples side by side that cannot fit in memory
        m = train_cfg.model
        check_mc_fits(ecfg.eval.mc_samples, batch_size, bptt, eval_window, len(corpus.vocab), m.hidden_size, m.num_layers)
    with fp32_products(train_cfg.trainer.tf32):  # on a GPU, the products the run was trained and validated with
        start = time.perf_counter()
        results = evaluate_all(model, corpus, batch_size, bptt, eval_window)
        seconds = time.perf_counter() - start
        print(format_results(results))
        mc = None
        if ecfg.eval.mc_samples:
            torch.manual_seed(ecfg.eval.mc_seed)
            start = time.perf_counter()
            mc_results = evaluate_all([model] * ecfg.eval.mc_samples, corpus, batch_size, bptt, eval_window, stochastic=True)
            mc = {
                "samples": ecfg.eval.mc_samples,
                "seed": ecfg.eval.mc_seed,
                "results": mc_results,
                "seconds": time.perf_counter() - start,
            }
            print(f"Monte Carlo dropout, {ecfg.eval.mc_samples} samples\n{format_results(mc_results)}")
    report = {
        "checkpoint": str(ckpt_path),
        "epoch": ckpt["epoch"],
        "batch_size": batch_size,
        "bptt": bptt,
        "protocols": PROTOCOL_DESCRIPTIONS,
        "results": results,
        "mc_dropout": mc,
        "seconds": seconds,  # the standard evaluation; the MC one's is in mc_dropout
        **provenance(device),
        "precision": precision_record(device, "fp32", train_cfg.trainer.tf32),  # evaluation is always fp32
    }
    atomic_write_json(output, report)
    print(f"wrote {output}")
    return report
