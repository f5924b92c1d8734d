"""One prepared command for an offline GPU machine: ``make gpu-check``.

In under ten minutes of a lent GPU, in order: install the dependencies from ``wheels/``
(``make wheels``) without touching the machine's own torch, print the GPU, torch and CUDA
versions, run the CUDA tests (``pytest -m cuda``), run ``scripts/bench.py --device cuda``, and
train the medium and large recipes at the same time on the one GPU until the 8.5-minute mark,
when both get SIGTERM (the trainer checkpoints and exits with 143, as expected). Checkpoints
stay in the run folders (``runs/gpu-check/``), which the next ``make gpu-check`` on the same
machine continues (``trainer.resume=auto``), never restarts; the output folder (``$OUT``, else
``gpu-check/``) gets only small files: ``summary.json`` (what ran, exit codes, minutes, the
versions, each run's epochs), ``gpu_check.log`` (the install, tests and bench output), the
bench's json, and per run ``train.log`` and ``metrics.json`` when it finished.

Only the standard library is imported here: the machine's Python may lack our dependencies
until the install phase has run, so every phase is a child process.

``--dry-run`` runs the same phases on CPU in seconds: no install, a tiny model on a synthetic
corpus for 2 steps, the bench at one size with few windows (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wheels import MANIFEST, requirements  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("zaremba_medium", "zaremba_large")
LOG_NAME = "gpu_check.log"
MINUTE = 60.0
# The trainer's line per epoch (lm/engine/epochs.py, _finish_epoch), after Hydra's "HH:MM:SS " prefix.
EPOCH_FIELDS = ("epoch", "lr", "train_ppl", "valid_ppl", "words_per_s", "seconds")


@dataclass
class Budget:
    """Seconds each phase may take; the training stop is a mark on the whole script's clock,
    so that time the earlier phases leave over goes to training."""

    install: float = 1.5 * MINUTE
    # one test file's collection (torch, hydra: ~15 s) and four cold compiles of a small LSTM step
    # (fp32 and bf16, first and later steps; tens of seconds each) beside the CUDA graph checks
    tests: float = 3.0 * MINUTE
    # five compiled step signatures (bf16 at three sizes, the masked variants at medium), one capture per
    # timed step; the bench writes its json after every size and skips what its deadline leaves no time for
    bench: float = 3.0 * MINUTE
    stop_training_at: float = 8.5 * MINUTE  # SIGTERM to both trainers, since the script started
    grace: float = 0.5 * MINUTE  # then SIGKILL: a checkpoint of the large model takes seconds


@dataclass
class Phase:
    """What one step of the check ran and how it ended: one entry of summary.json."""

    name: str
    command: list[str] = field(default_factory=list)
    exit_code: int | None = None
    minutes: float = 0.0
    timed_out: bool = False
    skipped: str | None = None
    ok: bool = False
    detail: dict = field(default_factory=dict)


class Clock:
    """Seconds since the script started."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start


# ---------------------------------------------------------------- child processes


def exit_code(returncode: int) -> int:
    """A shell's view of a child's end: killed by signal N reads 128 + N, as the trainer's own exits do."""
    return 128 - returncode if returncode < 0 else returncode


def send(process: subprocess.Popen, sig: int, whole_group: bool = False) -> None:
    """``sig`` to a child that may have ended meanwhile; ``whole_group`` reaches the children it
    started too (pytest's), all in the process group this script gave it."""
    if process.poll() is not None:
        return
    try:
        if whole_group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    except ProcessLookupError:
        pass


def wait_or_kill(process: subprocess.Popen, seconds: float, whole_group: bool = False) -> None:
    try:
        process.wait(timeout=max(seconds, 0.0))
    except subprocess.TimeoutExpired:
        send(process, signal.SIGKILL, whole_group)
        process.wait()


def stop(process: subprocess.Popen, grace: float, whole_group: bool = False) -> None:
    """SIGTERM (the trainer checkpoints on it), then SIGKILL after ``grace`` seconds."""
    if process.poll() is None:
        send(process, signal.SIGTERM, whole_group)
        wait_or_kill(process, grace, whole_group)


def run_phase(phase: Phase, timeout: float, env: dict, log_path: Path, grace: float = 10.0) -> Phase:
    """Run ``phase.command`` from the repository root, its output appended to ``log_path``, stopped
    (its whole process group) once ``timeout`` seconds have passed."""
    started = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n==== {phase.name}: {' '.join(phase.command)}\n")
        log.flush()
        process = subprocess.Popen(phase.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            phase.timed_out = True
        finally:
            stop(process, grace, whole_group=True)  # over its time, or the check interrupted
    phase.exit_code = exit_code(process.returncode)
    phase.minutes = (time.monotonic() - started) / MINUTE
    phase.ok = phase.exit_code == 0 and not phase.timed_out
    return phase


def child_env(dry_run: bool, data_dir: Path | None) -> dict:
    """The environment of every phase: this checkout's ``lm`` first on the path, no network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_DATASETS_OFFLINE"] = env["HF_HUB_OFFLINE"] = "1"  # datasets would wait on the network otherwise
    env["LM_FUSED"] = "0"  # the CPU kernels' build (a minute) serves no CUDA phase
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the machine's own pytest plugins may not fit our pytest
    # compiled kernels kept beside the runs: the next phase, process or rerun on this machine reuses them
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / "runs" / "inductor-cache"))
    if data_dir is not None:
        env["LM_DATA_DIR"] = str(data_dir)
    return env


# ---------------------------------------------------------------- install


def site_dirs() -> list[str]:
    """Where this interpreter's packages (torch among them) live, a venv's or conda's included."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if Path(d).is_dir()]


def overlay_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def create_overlay(folder: Path, dirs: list[str]) -> Path:
    """A venv in ``folder`` that also sees ``dirs`` (after its own packages): pip there installs only
    what those lack or pin otherwise, and never removes what they hold. ``--system-site-packages``
    would not do: from a Python that is itself a venv (the H200's is) it reaches the base Python,
    which has no torch."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    lib = next((folder / "lib").glob("python*/site-packages"))
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs]  # addsitedir: their own .pth files too
    (lib / "_gpu_check_outer.pth").write_text("\n".join(lines) + "\n")
    return overlay_python(folder)


def install_command(python: Path, wheels: Path, reqs: list[str]) -> list[str]:
    """pip from the overlay, offline, from the wheel folder only."""
    return [
        str(python),
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        str(wheels),
        "--no-input",
        "--no-compile",
        "--disable-pip-version-check",
        *reqs,
    ]


def wheels_problem(wheels: Path) -> str | None:
    """Why ``wheels`` cannot serve this Python, in one line, or None."""
    manifest = wheels / MANIFEST
    if not manifest.is_file():
        return f"{wheels}/{MANIFEST} not found: run `make wheels` on a machine with the network and copy {wheels}/ here"
    made_for = json.loads(manifest.read_text())["python_version"]
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if made_for != here:
        return f"{wheels}/ holds wheels for CPython {made_for}, this is {here}: run `make wheels ARGS='--python-version {here}'`"
    return None


IMPORT_CHECK = "import hydra, omegaconf, torch, tqdm, torch.utils.tensorboard; import lm.train, lm.ensemble, lm.evaluate"


def install(wheels: Path, folder: Path, env: dict, log_path: Path, timeout: float) -> tuple[Phase, Path | None]:
    """The overlay with the requirements the wheel folder was made for (``make wheels ARGS=--gpu``:
    no datasets, only hydra and omegaconf carried); reused while the wheels, the requirements and
    this Python are the same as when it was made. Where pip cannot resolve them against the
    machine's own packages (one of them older than our range, say), the carried wheels are
    installed as they are (``--no-deps``) and the phase passes if the project imports."""
    phase = Phase("install")
    problem = wheels_problem(wheels)
    if problem:
        phase.detail["error"] = problem
        return phase, None
    reqs = json.loads((wheels / MANIFEST).read_text()).get("requirements") or requirements()
    stamp = json.dumps({"python": sys.version, "reqs": reqs, "wheels": sorted(p.name for p in wheels.glob("*.whl"))})
    stamp_file = folder / ".installed"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        phase.skipped, phase.ok = f"{folder} already holds these wheels for this Python", True
        return phase, overlay_python(folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        python = create_overlay(folder, site_dirs())
    except (subprocess.CalledProcessError, StopIteration):
        phase.detail["error"] = f"{sys.executable} -m venv --without-pip {folder} made no venv (its message is above)"
        return phase, None
    phase.command = install_command(python, wheels, reqs)
    run_phase(phase, timeout, env, log_path)
    phase.detail["mode"] = "resolved"
    if not phase.ok:
        phase = _install_as_carried(python, wheels, env, log_path, timeout, phase)
    if phase.ok:
        stamp_file.write_text(stamp)
    return phase, python


def _install_as_carried(python: Path, wheels: Path, env: dict, log_path: Path, timeout: float, failed: Phase) -> Phase:
    """The fallback of ``install``: every carried wheel without its dependencies, then the imports."""
    phase = Phase("install", [*install_command(python, wheels, []), "--no-deps", *map(str, sorted(wheels.glob("*.whl")))])
    run_phase(phase, timeout, env, log_path)
    check = subprocess.run([str(python), "-c", IMPORT_CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    phase.ok = phase.ok and check.returncode == 0
    phase.detail = {
        "mode": "carried wheels as they are (--no-deps): pip could not resolve the requirements here",
        "resolve_exit_code": failed.exit_code,
        "imports": "ok" if check.returncode == 0 else (check.stderr.strip().splitlines() or ["failed"])[-1],
    }
    phase.minutes += failed.minutes
    return phase


# ---------------------------------------------------------------- versions, tests, bench

VERSIONS_SNIPPET = """
import json, platform, torch
cuda = torch.cuda.is_available()
props = torch.cuda.get_device_properties(0) if cuda else None
print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if cuda else None, "gpu": props.name if cuda else None,
    "gpu_memory_gib": round(props.total_memory / 2**30, 1) if cuda else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
    "bf16": torch.cuda.is_bf16_supported() if cuda else None,
}))
"""


def versions(python: Path, env: dict) -> dict:
    """The GPU, torch and CUDA as the phases' Python sees them."""
    done = subprocess.run([str(python), "-c", VERSIONS_SNIPPET], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


CUDA_TEST_FILES = ("tests/test_cuda.py",)  # the files holding the cuda-marked tests: collecting all of tests/ takes a minute


def tests_command(python: Path) -> list[str]:
    return [str(python), "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q", *CUDA_TEST_FILES]


def bench_command(python: Path, out: Path, dry_run: bool, seconds: float = Budget.bench) -> list[str]:
    """All three sizes in bench's quick form on the GPU, and the dropout strategies at medium (the
    variational step against the zaremba one); on CPU the smallest size alone, one thread. The bench
    starts nothing new after ``seconds`` less a margin, and has written what it measured by then."""
    deadline = ["--deadline", f"{max(seconds - 20.0, 10.0):.0f}"]
    if dry_run:
        return [
            str(python),
            "scripts/bench.py",
            "--device",
            "cpu",
            "--quick",
            "--sizes",
            "small",
            "--threads",
            "1",
            "--out",
            str(out / "bench-cpu.json"),
            *deadline,
        ]
    return [
        str(python),
        "scripts/bench.py",
        "--device",
        "cuda",
        "--quick",
        "--sizes",
        "small",
        "medium",
        "large",
        "--variants",
        "--out",
        str(out / "bench-cuda.json"),
        *deadline,
    ]


# ---------------------------------------------------------------- training


def write_tiny_corpus(folder: Path, seed: int = 0) -> Path:
    """train/valid/test.txt of short made-up sentences: the dry run's corpus (no PTB needed)."""
    rng = random.Random(seed)
    words = {
        "subject": ["the cat", "a dog", "the market", "she"],
        "verb": ["sees", "buys", "sold"],
        "object": ["the fish", "shares", "N dollars", "a plan"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", 200), ("valid", 40), ("test", 40)):
        text = "\n".join(" ".join(rng.choice(words[part]) for part in words) for _ in range(lines))
        (folder / f"{split}.txt").write_text(text + "\n")
    return folder


def training_command(python: Path, recipe: str, run_dir: Path, dry_run: bool, corpus: Path | None, extra: list[str]) -> list[str]:
    """``python -m lm.train`` of a recipe into its own folder; in a dry run the tiny model, 2 steps on CPU."""
    command = [
        str(python),
        "-m",
        "lm.train",
        f"experiment={recipe}",
        "trainer.seed=1",
        "trainer.progress=false",
        "trainer.resume=auto",  # a rerun on the same machine continues from the checkpoint
        f"hydra.run.dir={run_dir}",
    ]
    if dry_run:
        command += [
            "model=tiny",
            "data=custom",
            f"data.dir={corpus}",
            "data.batch_size=4",
            "data.bptt=5",
            "trainer.max_steps=2",
            "trainer.device=cpu",
            "trainer.threads=1",
        ]
    else:
        command += ["trainer.device=cuda", "data.download=false"]
    return command + extra


def train_concurrently(
    commands: dict[str, list[str]], logs: dict[str, Path], clock: Clock, stop_at: float, grace: float, env: dict
) -> dict[str, Phase]:
    """Start every command at once; SIGTERM those still running at ``stop_at`` (on ``clock``), SIGKILL
    after ``grace``. Exit 143 after our SIGTERM is the expected end of a run that had more to train."""
    processes: dict[str, subprocess.Popen] = {}
    ended: dict[str, float] = {}
    late: list[str] = []  # still running at the mark
    started = clock.now()
    try:
        for name, command in commands.items():
            with open(logs[name], "w") as log:  # the child keeps its own copy of the descriptor
                processes[name] = subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        while len(ended) < len(processes) and clock.now() < stop_at:
            time.sleep(min(1.0, max(0.05, stop_at - clock.now())))
            ended.update({n: clock.now() for n, p in processes.items() if n not in ended and p.poll() is not None})
        late[:] = [name for name in processes if name not in ended]
        for name in late:  # both at once: they checkpoint side by side
            send(processes[name], signal.SIGTERM)
        for name in late:
            wait_or_kill(processes[name], stop_at + grace - clock.now())
            ended[name] = clock.now()
    finally:
        for process in processes.values():  # an interrupted check leaves no trainer running
            stop(process, grace)
    phases = {}
    for name, command in commands.items():
        phase = Phase(
            f"train {name}",
            command,
            exit_code=exit_code(processes[name].returncode),
            minutes=(ended[name] - started) / MINUTE,
            detail={"stopped_by_deadline": name in late},
        )
        phase.ok = phase.exit_code in ((0, 143) if name in late else (0,))
        phases[name] = phase
    return phases


def epoch_records(log_text: str) -> list[dict]:
    """The trainer's per-epoch lines (``epoch  3  lr 1  train ppl ...  valid ppl ...  41234 words/s  22s``)
    as records, the numbers as the log rounds them."""
    records = []
    for line in log_text.splitlines():
        words = line.replace("train ppl", "train_ppl").replace("valid ppl", "valid_ppl").split()
        if "epoch" not in words or "words/s" not in words:
            continue
        at = words.index("epoch")
        try:
            values = [words[at + 1], words[at + 3], words[at + 5], words[at + 7], words[at + 8], words[at + 10].rstrip("s")]
            records.append({key: (int(v) if key == "epoch" else float(v)) for key, v in zip(EPOCH_FIELDS, values)})
        except (IndexError, ValueError):
            continue
    return records


def collect_run(run_dir: Path, into: Path, console: Path) -> dict:
    """Copy a run's small files (train.log, metrics.json) into ``into``; never its checkpoint.
    Returns its epochs, final numbers and the end of its console output for summary.json."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("train.log", "metrics.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, into / name)
    log_text = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    epochs = epoch_records(log_text)
    result = {
        "run_dir": str(run_dir),
        "epochs": epochs,
        "epochs_done": len(epochs),
        "console_tail": console.read_text(errors="replace").splitlines()[-15:] if console.is_file() else [],
    }
    if epochs:
        result["median_words_per_s"] = sorted(e["words_per_s"] for e in epochs)[len(epochs) // 2]
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result["final"] = {key: metrics.get(key) for key in ("valid_ppl", "test_ppl", "steps", "completed", "train_seconds")}
    return result


# ---------------------------------------------------------------- the check


def train_recipes(
    python: Path, args: argparse.Namespace, runs_dir: Path, out: Path, clock: Clock, budget: Budget, env: dict
) -> tuple[list[Phase], dict]:
    """Both recipes at once, each in a fresh folder of its own under ``runs_dir``; their small files
    copied into ``out``. Returns the phases and what summary.json says of each run."""
    corpus = write_tiny_corpus(runs_dir / "corpus") if args.dry_run else None
    data_dir = Path(env.get("LM_DATA_DIR", "."))
    if not args.dry_run and not (data_dir / "ptb.train.txt").is_file():
        problem = f"no PTB in {data_dir}: set LM_DATA_DIR to a folder with ptb.*.txt"
        say(clock, f"train: {problem}")
        return [Phase("train", detail={"error": problem})], {}
    commands, consoles = {}, {}
    for recipe in RECIPES:
        (runs_dir / recipe).mkdir(parents=True, exist_ok=True)  # continued, never emptied: a rerun picks up there
        commands[recipe] = training_command(python, recipe, runs_dir / recipe, args.dry_run, corpus, args.train_arg)
        consoles[recipe] = runs_dir / recipe / "console.log"
    say(clock, f"training {', '.join(RECIPES)} until the {budget.stop_training_at / MINUTE:.1f}-minute mark")
    trained = train_concurrently(commands, consoles, clock, budget.stop_training_at, budget.grace, env)
    runs = {}
    for recipe, phase in trained.items():
        runs[recipe] = collect_run(runs_dir / recipe, out / recipe, consoles[recipe])
        how = "stopped at the mark" if phase.detail["stopped_by_deadline"] else "finished"
        say(
            clock,
            f"{recipe}: {how}, exit {phase.exit_code}, {runs[recipe]['epochs_done']} epochs, "
            f"median {runs[recipe].get('median_words_per_s', 0):,.0f} words/s",
        )
    return list(trained.values()), runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same phases on CPU in seconds: no install, a tiny model")
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or "gpu-check", help="output folder (default $OUT, else gpu-check/)"
    )
    parser.add_argument("--wheels", default="wheels", help="the folder `make wheels` filled (default wheels/)")
    parser.add_argument("--venv", default=".gpu-venv", help="where the dependencies are installed (default .gpu-venv/)")
    parser.add_argument(
        "--runs-dir", default="runs/gpu-check", help="the training runs' folders, continued by a rerun (default runs/gpu-check/)"
    )
    parser.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override for both trainings, e.g. trainer.precision=bf16 (repeatable)",
    )
    parser.add_argument(
        "--stop-training-at",
        type=float,
        default=Budget.stop_training_at / MINUTE,
        help="minutes since the start at which the trainings get SIGTERM (default 8.5)",
    )
    return parser.parse_args(argv)


def say(clock: Clock, message: str) -> None:
    print(f"[{clock.now() / MINUTE:4.1f} min] {message}", flush=True)


def finish(phases: list[Phase], runs: dict, info: dict, out: Path, clock: Clock) -> int:
    """Write summary.json; 0 when every phase ended as expected."""
    ok = bool(phases) and all(p.ok for p in phases)
    summary = {
        **info,
        "ok": ok,
        "minutes": round(clock.now() / MINUTE, 2),
        "phases": [{**vars(p), "minutes": round(p.minutes, 2)} for p in phases],
        "runs": runs,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(clock, f"{'ok' if ok else 'FAILED'}: {out / 'summary.json'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock, budget = Clock(), Budget(stop_training_at=args.stop_training_at * MINUTE)
    out, runs_dir = Path(args.out).resolve(), Path(args.runs_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    log_path.write_text("")
    data_dir = None if args.dry_run else Path(os.environ.get("LM_DATA_DIR") or "data/ptb").resolve()
    env = child_env(args.dry_run, data_dir)
    info = {
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data_dir": str(data_dir) if data_dir else None,
    }
    phases: list[Phase] = []

    if args.dry_run:
        phases.append(Phase("install", skipped="--dry-run: the running Python's packages", ok=True))
        python = Path(sys.executable)
    else:
        phase, python = install(Path(args.wheels).resolve(), Path(args.venv).resolve(), env, log_path, budget.install)
        phases.append(phase)
        say(
            clock,
            "install: "
            + (phase.skipped or ("ok" if phase.ok else phase.detail.get("error") or f"exit {phase.exit_code}, see {log_path}")),
        )
        if not phase.ok:
            return finish(phases, {}, info, out, clock)

    info["versions"] = found = versions(python, env)
    say(clock, "versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    problem = found.get("error") or (
        None if args.dry_run or found.get("gpu") else "torch sees no GPU here (--dry-run runs on CPU)"
    )
    if problem:
        phases.append(Phase("versions", detail={"error": problem}))
        say(clock, f"versions: {problem}")
        return finish(phases, {}, info, out, clock)

    for phase, timeout in (
        (Phase("tests", tests_command(python)), budget.tests),
        (Phase("bench", bench_command(python, out, args.dry_run, budget.bench)), budget.bench),
    ):
        phases.append(run_phase(phase, timeout, env, log_path))
        say(clock, f"{phase.name}: exit {phase.exit_code}{' (timed out)' if phase.timed_out else ''}, {phase.minutes:.1f} min")

    trained, runs = train_recipes(python, args, runs_dir, out, clock, budget, env)
    return finish(phases + trained, runs, info, out, clock)


def interrupted(signum: int, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)  # like Ctrl-C: the trainings still get their SIGTERM and checkpoint
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("gpu_check: stopped; its running phases got SIGTERM (a training keeps its checkpoint)", file=sys.stderr)
        sys.exit(130)
