"""Model averaging (the paper's Table 1, second block), run by ``python -m lm.ensemble CKPT... --out DIR``.

The ensemble predicts the average of its members' probabilities for every
token (not of their log-probabilities), each member carrying its own state,
under both evaluation protocols. Writes ``DIR/ensemble.json`` and
``DIR/ensemble.log``.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Any

import torch

from lm.config import TrainConfig, validate_saved
from lm.data.batching import batchify
from lm.engine.evaluation import PROTOCOL_DESCRIPTIONS, evaluate_all, format_results
from lm.engine.runtime import (
    build_model_from_checkpoint,
    check_vocab,
    fp32_products,
    load_user_data,
    precision_record,
    provenance,
    select_device,
)
from lm.infra.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from lm.infra.outputs import (
    Output,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    claim,
    file_digest,
    json_of,
    text_starting,
)
from lm.infra.schema import ENSEMBLE

ENSEMBLE_NAME = "ensemble.json"
LOG_NAME = "ensemble.log"


def expand(patterns: list[str]) -> list[Path]:
    """Each argument as a path if one exists by that name (any characters, '[' and '*' included),
    else as a glob pattern."""
    paths: list[Path] = []
    for pattern in patterns:
        if Path(pattern).exists():
            path = Path(pattern)
            paths.append(path / CHECKPOINT_NAME if path.is_dir() and (path / CHECKPOINT_NAME).is_file() else path)
            continue
        matches = sorted(glob.glob(pattern))
        paths.extend(Path(m) for m in (matches or [pattern]))
    return paths


def refuse_duplicates(checkpoints: list[Path]) -> None:
    """Refuse a checkpoint given twice: by its path (links and folders included) or by its content (a
    copy), since an average of a model with itself is reported as two models."""
    seen: dict[str, Path] = {}
    for path in checkpoints:
        real = os.path.realpath(path)
        if real in seen:
            raise CheckpointError(f"{path} is {seen[real]} again: an average needs distinct models, give each checkpoint once")
        seen[real] = path
    by_size: dict[int, list[Path]] = {}
    for path in (p for p in checkpoints if p.is_file()):
        by_size.setdefault(path.stat().st_size, []).append(path)
    for paths in (group for group in by_size.values() if len(group) > 1):  # only files of one size can be copies
        digests: dict[str, Path] = {}
        for path in paths:
            digest = file_digest(path)
            if digest in digests:
                raise CheckpointError(
                    f"{path} holds the same model as {digests[digest]} (a copy, byte for byte): an average needs distinct models"
                )
            digests[digest] = path


def load_members(checkpoints: list[Path]) -> tuple[list[dict[str, Any]], list[TrainConfig]]:
    """The checkpoints and their configs; refuses fewer than 2, one given twice, or members of different corpora."""
    if len(checkpoints) < 2:
        raise CheckpointError("model averaging needs at least 2 checkpoints")
    refuse_duplicates(checkpoints)
    ckpts = [load_checkpoint(p) for p in checkpoints]
    cfgs = [validate_saved(c["config"]) for c in ckpts]
    first = cfgs[0]
    for path, ckpt, cfg in zip(checkpoints[1:], ckpts[1:], cfgs[1:]):
        if cfg.data.name != first.data.name or (
            ckpt.get("vocab") and ckpts[0].get("vocab") and ckpt["vocab"] != ckpts[0]["vocab"]
        ):
            raise CheckpointError(
                f"{path} was trained on another corpus or vocabulary than {checkpoints[0]}: average models of one corpus"
            )
    return ckpts, cfgs


def run_ensemble(
    checkpoints: list[Path],
    out_dir: Path,
    eval_window: int | None = None,
    with_members: bool = True,
    data_dir: str | None = None,
    device: str | torch.device = "auto",
) -> dict[str, Any]:
    """Evaluate the average of ``checkpoints`` (and each alone) on ``device`` (auto: a GPU if one is
    visible); ``eval_window`` defaults to the first checkpoint's ``trainer.eval_window``. The corpus
    comes from ``data_dir`` (for PTB by default ``$LM_DATA_DIR`` or data/ptb), never from the
    checkpoints' saved config."""
    check_output_folder(out_dir, "--out")
    claim(
        [
            Output(out_dir / ENSEMBLE_NAME, "--out", "an ensemble.json written by lm.ensemble", json_of(ENSEMBLE)),
            Output(
                out_dir / LOG_NAME, "--out", "an ensemble.log written by lm.ensemble", text_starting("member ", "average of ")
            ),
        ],
        {path: "a checkpoint it averages" for path in checkpoints},
    )
    device = select_device(str(device), "--device")
    ckpts, cfgs = load_members(checkpoints)
    first = cfgs[0]
    corpus = load_user_data(data_dir, first, key="--data-dir")
    for path, ckpt in zip(checkpoints, ckpts):
        try:
            check_vocab(ckpt, corpus.vocab)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
    models = [build_model_from_checkpoint(c, corpus.vocab) for c in ckpts]
    for model in models:  # all built on the host first: from the first move on, the work is on the device
        model.to(device)
    batch_size, bptt = first.data.batch_size, first.data.bptt
    for split in ("valid", "test"):  # before the work: a split too short for the batch size
        batchify(corpus.split(split), batch_size)
    eval_window = eval_window or first.trainer.eval_window
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    # On a GPU, the products the members were trained and validated with: IEEE fp32 unless every
    # member trained with TF32 (PyTorch's own defaults would run cuDNN's LSTM in TF32 and cuBLAS in IEEE)
    tf32 = all(c.trainer.tf32 for c in cfgs)
    start = time.perf_counter()
    members = []
    with fp32_products(tf32):
        for path, model in zip(checkpoints, models) if with_members else ():
            member_results = evaluate_all(model, corpus, batch_size, bptt, eval_window)
            say(f"member {path}\n{format_results(member_results)}")
            members.append({"checkpoint": str(path), "results": member_results})
        results = evaluate_all(models, corpus, batch_size, bptt, eval_window)
    say(f"average of {len(models)} models (mean of probabilities per token)\n{format_results(results)}")
    report = {
        "name": first.name,
        "n_models": len(models),
        "checkpoints": [str(p) for p in checkpoints],
        "seeds": [c.trainer.seed for c in cfgs],
        "averaging": "mean of the members' predicted probabilities per token",
        "batch_size": batch_size,
        "bptt": bptt,
        "protocols": PROTOCOL_DESCRIPTIONS,
        "valid_ppl": results["valid"]["batched"]["ppl"],
        "test_ppl": results["test"]["stream"]["ppl"],
        "results": results,
        "members": members,
        **provenance(device),
        "precision": precision_record(device, "fp32", tf32),  # evaluation is always fp32
        "seconds": time.perf_counter() - start,  # the evaluations (members', if asked, and the average's)
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / ENSEMBLE_NAME, report)
    atomic_write_text(out_dir / LOG_NAME, "\n".join(lines) + "\n")
    print(f"wrote {out_dir / ENSEMBLE_NAME}")
    return report
