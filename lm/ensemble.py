"""``python -m lm.ensemble CKPT... --out DIR``: the average of several checkpoints' predicted
probabilities under both protocols (``lm.engine.averaging``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lm.engine.averaging import expand, run_ensemble
from lm.infra.cli import ArgumentParser, guarded, positive_int, thread_count


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m lm.ensemble", description="Average the predicted probabilities of several checkpoints."
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoint paths or glob patterns (quote them)")
    parser.add_argument("--out", required=True, help="folder for ensemble.json and ensemble.log")
    parser.add_argument(
        "--eval-window",
        type=positive_int,
        help="window of the one-stream protocol (default: the checkpoints' trainer.eval_window)",
    )
    parser.add_argument("--data-dir", help="the corpus folder (default for PTB: $LM_DATA_DIR, else data/ptb)")
    parser.add_argument("--no-members", action="store_true", help="skip evaluating each member alone")
    parser.add_argument("--threads", type=thread_count, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the models run (auto: a GPU if visible)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    guarded(
        lambda: run_ensemble(
            expand(args.checkpoints), Path(args.out), args.eval_window, not args.no_members, args.data_dir, args.device
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
