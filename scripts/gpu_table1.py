"""The rows of Table 1 a CPU cannot train, on a lent GPU in one command: ``make gpu-table1``.

On the device, in at most ``--minutes`` (9.5), in order: install ``wheels/`` beside the
machine's torch (``make wheels ARGS=--gpu``, as ``make gpu-check`` does), print the GPU,
start CUDA's Multi-Process Service where it works (``--mps auto``: the five trainings then
share the GPU's multiprocessors instead of taking turns on all of them), check on a small
model that the training step replayed as a CUDA graph trains as the eager step (else every
run trains eagerly, which metrics.json records), then three ``python -m lm.reproduce`` plans,
each with a root of its own under ``runs/gpu-table1/``: side by side with MPS, one after
another without it (``waves``; ``--concurrency`` chooses):

- ``large``: ``experiment=zaremba_large`` seed 1;
- ``gal``: ``experiment=gal_medium`` seed 1, then its Monte Carlo dropout evaluation;
- ``medium``: ``experiment=zaremba_medium`` seeds 1-3 (three at once), then the averages of 2 and 3.

At ``--minutes`` less a margin every plan gets SIGTERM: each training writes its checkpoint
and the plan exits (143, as expected). The same command again, on the same machine, continues
every run from its checkpoint and skips what is done (never restarts). Checkpoints stay on the
device; the output folder (``$OUT``, else ``gpu-table1/``) gets three small files:
``summary.json`` (each phase and each step: what it did, its state before and after, minutes,
epochs, words/s, perplexities, the tail of a failed step's log), ``gpu_table1.log`` (install
and checks) and ``gpu-table1.tar.gz`` (every metrics.json, eval.json, ensemble.json and log
under the root). Where it comes back, ``make gpu-table1-import FROM=<that folder>`` puts them
into ``results/gpu-table1/`` and regenerates the table, with the GPU in its hardware column.

``--dry-run`` runs the whole plan on the CPU: no install, no MPS, the tiny model for 5 steps
on a made-up corpus, 2 Monte Carlo samples, and the CUDA graph bookkeeping emulated
(``LM_CUDA_GRAPHS=emulate``); ``tests/test_gpu_table1.py`` runs it. Like ``gpu_check.py`` this
imports only the standard library (the machine's Python lacks hydra until the install phase);
the self-check is a child process that imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check  # noqa: E402
from gpu_check import MINUTE, Clock, Phase, epoch_records  # noqa: E402

REPO = gpu_check.REPO
LOG_NAME = "gpu_table1.log"
ARCHIVE = "gpu-table1.tar.gz"
# What comes back of the root: the files results/ keeps (never a checkpoint or TensorBoard's events)
BROUGHT_BACK = ("metrics.json", "eval.json", "ensemble.json", "ensemble.log", "train.log", "console.log", "README.md")
STOP_MARGIN = 0.75 * MINUTE  # before --minutes: SIGTERM, then the checkpoints, the plans' tables, the archive
GRACE = 0.5 * MINUTE  # SIGTERM to SIGKILL: a large checkpoint is 264 MB
DRY_TRAIN_ARGS = ("model=tiny", "data=custom", "data.batch_size=4", "data.bptt=5", "trainer.max_steps=5", "trainer.device=cpu")
GPU_TRAIN_ARGS = ("trainer.device=cuda", "data.download=false")


@dataclass(frozen=True)
class Part:
    """One ``lm.reproduce`` plan: its ``--parts`` name (and folder under the root), its trainings at
    once, and the steps it holds as (name, folder relative to its root, kind), as lm.reproduce names them."""

    name: str
    jobs: int
    extra: tuple[str, ...]
    steps: tuple[tuple[str, str, str], ...]


PARTS = (
    Part("large", 1, (), (("train zaremba_large seed 1", "zaremba_large/seed-1", "train"),)),
    Part(
        "gal",
        1,
        (),
        (
            ("train gal_medium seed 1", "gal_medium/seed-1", "train"),
            ("evaluate gal_medium seed 1 with Monte Carlo dropout", "gal_medium/seed-1", "mc"),
        ),
    ),
    Part(
        "medium",
        3,
        ("--medium-models", "3"),
        (
            *((f"train zaremba_medium seed {s}", f"zaremba_medium/seed-{s}", "train") for s in (1, 2, 3)),
            ("average 2 zaremba_medium models", "zaremba_medium/average-2", "average"),
            ("average 3 zaremba_medium models", "zaremba_medium/average-3", "average"),
        ),
    ),
)
RESULT_OF = {"train": "metrics.json", "mc": "eval.json", "average": "ensemble.json"}
PRIORITY = ("medium", "gal", "large")  # one plan at a time: the averages' members first, the large model last


def waves(parts: list[Part], concurrency: str, mps_used: bool) -> list[list[Part]]:
    """The plans that run together, wave after wave. With MPS (or ``--concurrency all``) every plan at
    once: five trainings whose small kernels share the multiprocessors. Without it the GPU takes turns
    between processes, so five at once would each reach the mark a fifth done: one plan at a time
    instead (each of its trainings after the other), in ``PRIORITY`` order, so that what the mark
    cuts is the last plan, not all of them."""
    if concurrency == "all" or (concurrency == "auto" and mps_used):
        return [parts]
    ordered = sorted(parts, key=lambda p: PRIORITY.index(p.name))
    return [[dataclasses.replace(p, jobs=1)] for p in ordered]


# ---------------------------------------------------------------- the steps, read from their folders


def step_state(folder: Path, kind: str) -> str:
    """done (its result file exists), partial (a training with a checkpoint to continue) or not started."""
    if (folder / RESULT_OF[kind]).is_file():
        return "done"
    if kind == "train" and (folder / "checkpoint.pt").is_file():
        return "partial"
    return "not started"


def step_record(root: Path, part: Part, step: tuple[str, str, str], before: str, console: str) -> dict:
    """What summary.json says of one step: its state before and after this run, this run's minutes for
    it, and what its files say (epochs, words/s, perplexities; a failed step's log tail)."""
    name, relative, kind = step
    folder = root / part.name / relative
    record = {"part": part.name, "step": name, "before": before, "after": step_state(folder, kind)}
    done = re.search(rf"^done: {re.escape(name)} \(([0-9.]+) min\)", console, re.M)
    if done:
        record["minutes_this_run"] = float(done.group(1))
    if re.search(rf"^failed: {re.escape(name)} ", console, re.M):
        record["after"] = "failed"
        log = root / part.name / "logs" / (name.replace(" ", "_") + ".log")
        record["log_tail"] = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
    if kind == "train" and (folder / "train.log").is_file():
        epochs = epoch_records((folder / "train.log").read_text(errors="replace"))
        if epochs:
            record["epochs_done"] = epochs[-1]["epoch"]
            record["seconds_per_epoch_median"] = sorted(e["seconds"] for e in epochs)[len(epochs) // 2]
            record["words_per_s_median"] = sorted(e["words_per_s"] for e in epochs)[len(epochs) // 2]
            record["last_valid_ppl"] = epochs[-1]["valid_ppl"]
    result = folder / RESULT_OF[kind]
    if record["after"] == "done":
        data = json.loads(result.read_text())
        if kind == "train":
            keep = ("valid_ppl", "test_ppl", "train_seconds", "wall_seconds", "sessions", "completed", "step_paths")
            record.update({k: data.get(k) for k in keep})
            record["epochs_total"] = len(data.get("epochs", []))
        elif kind == "average":
            record.update({k: data.get(k) for k in ("valid_ppl", "test_ppl", "seconds")})
        else:
            mc = data.get("mc_dropout") or {}
            record["test_ppl"] = data["results"]["test"]["stream"]["ppl"]
            record["mc_test_ppl"] = (mc.get("results") or {}).get("test", {}).get("stream", {}).get("ppl")
            record.update({"mc_samples": mc.get("samples"), "mc_seconds": mc.get("seconds"), "seconds": data.get("seconds")})
    return record


# ---------------------------------------------------------------- the phases before the plans


def start_mps(mode: str, folder: Path, python: str, env: dict, dry_run: bool) -> Phase:
    """CUDA's Multi-Process Service for the trainings, where ``mode`` allows and a probe through it works:
    without it, processes on one GPU take turns on the whole chip; with it their kernels run side by side,
    which small-batch LSTM steps (a few multiprocessors each) leave room for. Its variables go into ``env``."""
    phase = Phase("mps")
    control = shutil.which("nvidia-cuda-mps-control")
    if mode == "off" or dry_run or control is None:
        phase.skipped = "--mps off" if mode == "off" else "--dry-run: no GPU" if dry_run else "nvidia-cuda-mps-control not found"
        phase.ok = mode != "on" or dry_run
        return phase
    started = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    mps = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in mps.values():
        Path(path).mkdir(exist_ok=True)
    try:
        stop_mps({**env, **mps})  # one left by an interrupted run on this machine would refuse a second
        subprocess.run([control, "-d"], env={**env, **mps}, check=True, timeout=30, capture_output=True)
        probe = "import torch; x = torch.ones(4, device='cuda'); assert float(x.sum()) == 4.0; print('mps ok')"
        subprocess.run([python, "-c", probe], env={**env, **mps}, check=True, timeout=90, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as err:
        stop_mps({**env, **mps})
        reason = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
        phase.detail = {"used": False, "why": (reason or ["probe failed"])[-1][:200]}
        phase.ok = mode != "on"
    else:
        env.update(mps)
        phase.detail, phase.ok = {"used": True, **mps}, True
    phase.minutes = (time.monotonic() - started) / MINUTE
    return phase


def stop_mps(env: dict) -> None:
    control = shutil.which("nvidia-cuda-mps-control")
    if control and "CUDA_MPS_PIPE_DIRECTORY" in env:
        try:
            subprocess.run([control], input="quit\n", env=env, timeout=30, capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError):
            pass


def run_self_check(python: str, device: str, env: dict) -> Phase:
    """The graphed step against the eager one on a small model (``--self-check``, a child process);
    where they disagree or the capture fails, the trainings run eagerly (``LM_CUDA_GRAPHS=0`` in ``env``)."""
    phase = Phase("self-check", [python, str(Path(__file__).resolve()), "--self-check", "--device", device])
    started = time.monotonic()
    done = subprocess.run(phase.command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    phase.exit_code, phase.minutes = done.returncode, (time.monotonic() - started) / MINUTE
    try:
        phase.detail = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        phase.detail = {"ok": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    if not phase.detail.get("ok"):
        env["LM_CUDA_GRAPHS"] = "0"
        phase.detail["then"] = "every training runs the eager step (LM_CUDA_GRAPHS=0)"
    phase.ok = True  # a failed check changes how the runs train, not whether they can
    return phase


def self_check(device_name: str) -> dict:
    """A small model, 12 windows at the recipes' batch and length, trained with the step replayed as a
    graph and eagerly from the same start, no dropout: the same parameters to float tolerance."""
    import torch

    from lm.data.batching import batchify, bptt_windows
    from lm.engine.step import StepOptions, graphs_status, train_epoch
    from lm.model.language_model import LanguageModel

    device = torch.device(device_name)
    count = 12 if device.type == "cuda" else 6  # a dry run's CPU: 3 warm-up steps, the capture, 2 more replays
    ids = torch.randint(0, 200, (20 * (35 * count + 1),), generator=torch.Generator().manual_seed(0))
    windows = bptt_windows(batchify(ids, 20).to(device), 35)
    models, nll = {}, {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(200, 64, 2, 0.0, 0.1).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1.0, foreach=True)
        progress = train_epoch(model, windows, opt, StepOptions(max_grad_norm=5.0, cuda_graphs=graphed))
        models[graphed], nll[graphed] = model, progress.nll
    diff = max(float((a - b).abs().max()) for a, b in zip(models[False].parameters(), models[True].parameters()))
    status = graphs_status(models[True])
    ok = bool(status and status["failure"] is None and status["replayed_steps"] > 0 and diff < 1e-3 and math.isfinite(nll[True]))
    return {"ok": ok, "max_parameter_difference": diff, "nll": [nll[False], nll[True]], "graphs": status}


# ---------------------------------------------------------------- the plans


def part_command(python: str, part: Part, root: Path, args: argparse.Namespace, corpus: Path | None) -> list[str]:
    command = [python, "-m", "lm.reproduce", "--root", str(root / part.name), "--parts", part.name, "--jobs", str(part.jobs)]
    command += ["--mc-samples", str(args.mc_samples), *part.extra]
    for arg in (*(DRY_TRAIN_ARGS if args.dry_run else GPU_TRAIN_ARGS), *args.train_arg):
        command += ["--train-arg", arg]
    return command + (["--data-dir", str(corpus)] if corpus is not None else [])


def collect(root: Path, out: Path) -> Path:
    """The small files of every plan under ``root`` into one archive (``$OUT`` brings back 8 files at most)."""
    archive = out / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(root.rglob("*")):
            small = path.name in BROUGHT_BACK or (path.parent.name == "logs" and path.suffix == ".log")
            if path.is_file() and small and "tb" not in path.relative_to(root).parts:
                tar.add(path, arcname=str(path.relative_to(root)))
    return archive


def import_results(source: Path, into: Path) -> list[str]:
    """What ``make gpu-table1`` brought back (its output folder, or the archive itself) into ``into``:
    only the archive's small result files, never a path outside ``into``; ``summary.json`` beside them."""
    archive = source / ARCHIVE if source.is_dir() else source
    if not archive.is_file():
        raise SystemExit(
            f"error: {archive} not found: give FROM=the folder make gpu-table1 wrote (with {ARCHIVE}) or the archive"
        )
    into.mkdir(parents=True, exist_ok=True)
    imported = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            name = Path(member.name).name
            allowed = name in BROUGHT_BACK or (len(parts) > 1 and parts[-2] == "logs" and name.endswith(".log"))
            if not member.isfile() or Path(member.name).is_absolute() or ".." in parts or not allowed:
                continue
            target = into / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            imported.append(member.name)
    summary = archive.parent / "summary.json"
    if summary.is_file():
        shutil.copy2(summary, into / "summary.json")
    return imported


# ---------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the whole plan on the CPU: the tiny model, 5 steps per run")
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or "gpu-table1", help="output folder (default $OUT, else gpu-table1/)"
    )
    parser.add_argument("--wheels", default="wheels", help="the folder `make wheels ARGS=--gpu` filled (default wheels/)")
    parser.add_argument("--venv", default=".gpu-venv", help="where the dependencies are installed (default .gpu-venv/)")
    parser.add_argument(
        "--root", default="runs/gpu-table1", help="the plans' runs, continued by a rerun (default runs/gpu-table1/)"
    )
    parser.add_argument("--minutes", type=float, default=9.5, help="the whole command's time, checkpoints included (default 9.5)")
    parser.add_argument("--mc-samples", type=int, default=None, help="Monte Carlo dropout samples (default 100; 2 in a dry run)")
    parser.add_argument("--mps", choices=("auto", "on", "off"), default="auto", help="CUDA MPS for the shared GPU (default auto)")
    parser.add_argument(
        "--concurrency",
        choices=("auto", "all", "sequential"),
        default="auto",
        help="every plan at once, or one after another (default auto: at once with MPS only)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=[p.name for p in PARTS],
        default=[p.name for p in PARTS],
        help="the plans to run (default all: large gal medium)",
    )
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE", help="an override for every training")
    parser.add_argument("--self-check", action="store_true", help=argparse.SUPPRESS)  # the child of the self-check phase
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--import-from", metavar="PATH", help="bring what make gpu-table1 wrote into --into, then exit")
    parser.add_argument("--into", default="results/gpu-table1", help="where --import-from puts it (default results/gpu-table1)")
    args = parser.parse_args(argv)
    if args.mc_samples is None:
        args.mc_samples = 2 if args.dry_run else 100
    return args


def finish(phases: list[Phase], steps: list[dict], info: dict, out: Path, clock: Clock) -> int:
    ok = bool(phases) and all(p.ok for p in phases) and not any(s["after"] == "failed" for s in steps)
    summary = {
        **info,
        "ok": ok,
        "minutes": round(clock.now() / MINUTE, 2),
        "phases": [{**vars(p), "minutes": round(p.minutes, 2)} for p in phases],
        "steps": steps,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for s in steps:
        numbers = ", ".join(
            f"{k} {s[k]:.2f}" if isinstance(s[k], float) else f"{k} {s[k]}"
            for k in ("epochs_done", "minutes_this_run", "valid_ppl", "test_ppl", "mc_test_ppl")
            if s.get(k) is not None
        )
        gpu_check.say(clock, f"{s['step']}: {s['before']} -> {s['after']}" + (f" ({numbers})" if numbers else ""))
    gpu_check.say(clock, f"{'ok' if ok else 'FAILED'}: {out / 'summary.json'}, {out / ARCHIVE}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.self_check:
        print(json.dumps(self_check(args.device)))
        return 0
    if args.import_from:
        into = Path(args.into)
        imported = import_results(Path(args.import_from), into)
        print(f"imported {len(imported)} files into {into}/; `make table` puts them in results/README.md")
        return 0
    clock = Clock()
    out, root = Path(args.out).resolve(), Path(args.root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    log_path.write_text("")
    data_dir = None if args.dry_run else Path(os.environ.get("LM_DATA_DIR") or "data/ptb").resolve()
    env = gpu_check.child_env(args.dry_run, data_dir)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor-cache")  # a rerun here compiles nothing again
    info = {
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "root": str(root),
        "minutes_allowed": args.minutes,
    }
    phases: list[Phase] = []

    if args.dry_run:
        phases.append(Phase("install", skipped="--dry-run: the running Python's packages", ok=True))
        python = sys.executable
        env["LM_CUDA_GRAPHS"] = "emulate"  # the graph bookkeeping on the CPU
    else:
        phase, venv_python = gpu_check.install(
            Path(args.wheels).resolve(), Path(args.venv).resolve(), env, log_path, 1.5 * MINUTE
        )
        phases.append(phase)
        gpu_check.say(clock, "install: " + (phase.skipped or ("ok" if phase.ok else phase.detail.get("error") or "failed")))
        if not phase.ok:
            return finish(phases, [], info, out, clock)
        python = str(venv_python)
    info["versions"] = found = gpu_check.versions(Path(python), env)
    gpu_check.say(clock, "versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    problem = found.get("error") or (
        None if args.dry_run or found.get("gpu") else "torch sees no GPU here (--dry-run runs on CPU)"
    )
    if not problem and not args.dry_run and not (data_dir / "ptb.train.txt").is_file():
        problem = f"no PTB in {data_dir}: carry data/ptb (or set LM_DATA_DIR to a folder with ptb.*.txt)"
    if problem:
        phases.append(Phase("versions", detail={"error": problem}))
        gpu_check.say(clock, f"stopped: {problem}")
        return finish(phases, [], info, out, clock)

    corpus = gpu_check.write_tiny_corpus(root / "corpus") if args.dry_run else None
    parts = [p for p in PARTS if p.name in args.parts]
    steps_before = {(p.name, s[0]): step_state(root / p.name / s[1], s[2]) for p in parts for s in p.steps}
    try:
        mps = start_mps(args.mps, root / "mps", python, env, args.dry_run)
        phases.append(mps)
        gpu_check.say(clock, f"mps: {mps.skipped or mps.detail}")
        phases.append(run_self_check(python, "cpu" if args.dry_run else "cuda", env))
        gpu_check.say(clock, f"self-check of the CUDA graph step: {phases[-1].detail}")
        consoles = {p.name: root / p.name / "console.log" for p in parts}
        for console in consoles.values():
            console.parent.mkdir(parents=True, exist_ok=True)
            console.unlink(missing_ok=True)  # this run's lines only: a plan not reached has none
        stop_at = args.minutes * MINUTE - STOP_MARGIN - GRACE
        for wave in waves(parts, args.concurrency, mps_used=bool(mps.detail.get("used"))):
            if clock.now() >= stop_at:
                phases += [Phase(f"plan {p.name}", skipped="the mark came first: the next run starts it", ok=True) for p in wave]
                continue
            commands = {p.name: part_command(python, p, root, args, corpus) for p in wave}
            gpu_check.say(clock, f"plans {', '.join(commands)} until the {stop_at / MINUTE:.1f}-minute mark")
            ran = gpu_check.train_concurrently(commands, {n: consoles[n] for n in commands}, clock, stop_at, GRACE, env)
            for name, phase in ran.items():
                phase.name = f"plan {name}"
                phases.append(phase)
    finally:
        stop_mps(env)
    steps = []
    for part in parts:
        console = consoles[part.name].read_text(errors="replace") if consoles[part.name].is_file() else ""
        steps += [step_record(root, part, s, steps_before[(part.name, s[0])], console) for s in part.steps]
    started = time.monotonic()
    collect(root, out)
    phases.append(
        Phase("collect", detail={"archive": str(out / ARCHIVE)}, ok=True, minutes=(time.monotonic() - started) / MINUTE)
    )
    return finish(phases, steps, info, out, clock)


def interrupted(signum: int, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)  # the plans still get their SIGTERM and checkpoint
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("gpu_table1: stopped; its plans got SIGTERM (every training keeps its checkpoint)", file=sys.stderr)
        sys.exit(130)
