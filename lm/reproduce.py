"""``python -m lm.reproduce`` (``make reproduce``): every row of Table 1 in one command.

The paper's rows need many runs: 10 small models (single and averages of 2, 5 and 10), 3 medium
(mean ± std, averages of 2 and 3), a large one, and Gal & Ghahramani's variational medium model
(standard and Monte Carlo dropout evaluation); ``--parts placement`` adds the paper's argument at
the medium size, ``--parts gru`` the small and medium recipes with a GRU. The plan
(``lm.engine.reproduction``) runs the steps whose inputs are ready, ``--jobs`` at a time,
continues where a stop, a crash or a new session left it, and ends with the table of what is
done. ``--estimate`` prints the hours it would take here instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lm.engine.reproduction import DEFAULT_PARTS, PARTS, SET_HERE, Report, bf16_where_native, check_train_args, reproduce
from lm.infra.cli import ArgumentParser, guarded, positive_int
from lm.infra.errors import UsageError
from lm.reporting.publish import claim_report, write_report

REPORT = Report(claim=claim_report, write=lambda root: write_report(root, plots=True, readme=None))


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lm.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/table1", help="folder of every run, average and evaluation (default runs/table1)")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(DEFAULT_PARTS),
        help="rows to reproduce (default: Table 1's, small medium large gal); placement: the medium recipe with "
        "dropout on h_{t-1} too and with none, 39 epochs each; gru: the small and medium recipes with model.cell=gru",
    )
    p.add_argument("--jobs", type=positive_int, default=1, help="steps at once; the cores are shared among them")
    p.add_argument("--small-models", type=positive_int, default=10, help="small models trained (the paper averages 2, 5, 10)")
    p.add_argument("--medium-models", type=positive_int, default=3, help="medium models trained (mean ± std; averages of 2, 3)")
    p.add_argument("--mc-samples", type=positive_int, default=100, help="Monte Carlo dropout samples for the variational model")
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override added to every training, e.g. trainer.precision=bf16 (repeatable)",
    )
    p.add_argument("--data-dir", help="the corpus folder for every step (default for PTB: $LM_DATA_DIR, else data/ptb)")
    p.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="only the steps whose name matches, as --dry-run lists them ('*' for any text), e.g. 'train "
        "zaremba_medium *' or 'average*' (repeatable); to run, each step they need must be done or selected",
    )
    p.add_argument(
        "--bf16-where-native",
        action="store_true",
        help="train in bf16 where this machine multiplies bf16 natively (AVX512-BF16, AMX, Arm BF16, a GPU with "
        "native bf16), each recipe's precision (fp32) elsewhere; off by default, as the paper trains in fp32 "
        "(the committed medium runs trained in bf16; results/precision/ compares the two)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and what is done, run nothing")
    mode.add_argument(
        "--estimate",
        action="store_true",
        help="time a few windows of each step's training and evaluation here (under 3 min on 2 cores), in "
        "the precision it would use, and print the hours per row, in all and left; run nothing",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    def body() -> None:
        for arg in args.train_arg:
            if "=" not in arg or arg.split("=", 1)[0].lstrip("+~") in SET_HERE:
                raise UsageError(
                    f"--train-arg {arg!r}: give KEY=VALUE, a key other than {', '.join(SET_HERE)} (this command sets them)"
                )
        extra = [*args.train_arg, *(bf16_where_native(args.train_arg) if args.bf16_where_native else [])]
        check_train_args(args.parts, extra, args.data_dir)
        code = reproduce(
            Path(args.root),
            args.parts,
            args.jobs,
            args.small_models,
            args.medium_models,
            args.mc_samples,
            extra,
            args.data_dir,
            args.dry_run,
            args.only,
            args.estimate,
            REPORT,
        )
        if code:
            raise SystemExit(code)

    guarded(body)


if __name__ == "__main__":
    main(sys.argv[1:])
