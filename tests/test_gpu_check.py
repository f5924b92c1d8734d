"""make gpu-check: the wheel folder's check, the install beside the running Python's packages,
the log parsing, the stop at the mark, and the whole check run dry on CPU (no network, no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402
import wheels  # noqa: E402


def test_wheels_for_another_python_are_refused_in_one_line(tmp_path):
    assert "run `make wheels`" in gpu_check.wheels_problem(tmp_path)
    (tmp_path / wheels.MANIFEST).write_text(json.dumps({"python_version": "2.7"}))
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert gpu_check.wheels_problem(tmp_path) == (
        f"{tmp_path}/ holds wheels for CPython 2.7, this is {here}: run `make wheels ARGS='--python-version {here}'`"
    )
    (tmp_path / wheels.MANIFEST).write_text(json.dumps({"python_version": here}))
    assert gpu_check.wheels_problem(tmp_path) is None


def test_the_overlay_sees_the_running_pythons_packages(tmp_path):
    """What lets the GPU machine's own torch serve the check: the overlay imports it, and pip runs there."""
    python = gpu_check.create_overlay(tmp_path / "venv", gpu_check.site_dirs())
    done = subprocess.run([str(python), "-c", "import pip, pytest, sys; print(sys.prefix)"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "venv")


def test_epoch_lines_of_the_trainers_log_become_records():
    log = (
        "12:00:01 zaremba_medium: 19,775,200 parameters, 1327 train windows of 20x35 per epoch, device cuda, 16 threads, fp32\n"
        "12:00:20 epoch  1  lr 1  train ppl   612.29  valid ppl   281.02   52341 words/s     18s\n"
        "12:00:39 epoch 12  lr 0.3349  train ppl    88.10  valid ppl   101.20  123456 words/s      7s\n"
    )
    assert gpu_check.epoch_records(log) == [
        {"epoch": 1, "lr": 1.0, "train_ppl": 612.29, "valid_ppl": 281.02, "words_per_s": 52341.0, "seconds": 18.0},
        {"epoch": 12, "lr": 0.3349, "train_ppl": 88.1, "valid_ppl": 101.2, "words_per_s": 123456.0, "seconds": 7.0},
    ]


@pytest.mark.full
def test_a_run_still_going_at_the_mark_gets_sigterm_and_counts_as_expected(tmp_path):
    clock = gpu_check.Clock()
    commands = {"quick": [sys.executable, "-c", "pass"], "long": [sys.executable, "-c", "import time; time.sleep(60)"]}
    logs = {name: tmp_path / f"{name}.log" for name in commands}
    phases = gpu_check.train_concurrently(commands, logs, clock, stop_at=clock.now() + 1.0, grace=10.0, env=None)
    assert clock.now() < 10
    assert (phases["quick"].exit_code, phases["quick"].detail["stopped_by_deadline"], phases["quick"].ok) == (0, False, True)
    assert (phases["long"].exit_code, phases["long"].detail["stopped_by_deadline"], phases["long"].ok) == (143, True, True)


@pytest.mark.full
def test_dry_run_writes_the_summary_and_small_files_only(tmp_path):
    """The whole check on CPU: every phase, both trainings to their end, nothing heavy in the output."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out), "--runs-dir", str(runs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    names = [p["name"] for p in summary["phases"]]
    assert names == ["install", "tests", "bench", "train zaremba_medium", "train zaremba_large"]
    assert summary["versions"]["torch"] and (out / "bench-cpu.json").is_file()
    for recipe in gpu_check.RECIPES:
        assert (out / recipe / "train.log").is_file() and (out / recipe / "metrics.json").is_file()
        assert [e["epoch"] for e in summary["runs"][recipe]["epochs"]] == [1]  # the trainer's epoch line was read
        assert summary["runs"][recipe]["final"]["steps"] == 2
        assert (runs / recipe / "checkpoint.pt").is_file()  # kept in the run folder ...
    assert not [p for p in out.rglob("*") if p.suffix == ".pt" or p.name == "tb"]  # ... never in the output


def test_a_second_check_continues_the_first_ones_runs(tmp_path, monkeypatch):
    """A rerun on the same machine (runs/ survives between calls there) continues each training from its
    checkpoint: nothing under the runs folder is removed, and every trainer is told to resume."""
    runs = tmp_path / "runs"
    kept = runs / "zaremba_large" / "checkpoint.pt"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"the first check's checkpoint")
    started = {}

    def no_training(commands, logs, clock, stop_at, grace, env):
        started.update(commands)
        return {
            name: gpu_check.Phase(f"train {name}", command, exit_code=0, ok=True, detail={"stopped_by_deadline": False})
            for name, command in commands.items()
        }

    monkeypatch.setattr(gpu_check, "train_concurrently", no_training)
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--runs-dir", str(runs)])
    (tmp_path / "out").mkdir()
    gpu_check.train_recipes(sys.executable, args, runs, tmp_path / "out", gpu_check.Clock(), gpu_check.Budget(), {})
    assert kept.read_bytes() == b"the first check's checkpoint"
    assert set(started) == set(gpu_check.RECIPES)
    assert all("trainer.resume=auto" in command for command in started.values())


def test_the_phases_fit_the_lent_machines_ten_minutes():
    """Install, CUDA tests (one file: collecting all of tests/ takes a minute), bench, then training to the
    mark and its grace: under the 10 minutes a command may run, with the bench told to stop in time."""
    budget = gpu_check.Budget()
    assert budget.install + budget.tests + budget.bench < budget.stop_training_at
    assert budget.stop_training_at + budget.grace <= 9.5 * gpu_check.MINUTE
    assert gpu_check.tests_command("python")[-len(gpu_check.CUDA_TEST_FILES) :] == list(gpu_check.CUDA_TEST_FILES)
    command = gpu_check.bench_command("python", REPO, dry_run=False, seconds=budget.bench)
    assert command[command.index("--deadline") + 1] == f"{budget.bench - 20:.0f}"


def _tiny_wheel(folder, name="lm_carried_probe", version="0.1"):
    """A pure-Python wheel of one empty module, as `make wheels` would carry it."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, text in files.items():
            whl.writestr(member, text)
    return path


@pytest.mark.full
def test_an_install_pip_cannot_resolve_falls_back_to_the_carried_wheels_as_they_are(tmp_path):
    """A requirement the machine's packages cannot meet offline (an older version there, say) must not stop
    the whole check: the carried wheels are installed without their dependencies, and the phase passes
    when the project's commands import."""
    wheels_dir = tmp_path / "wheels"
    wheels_dir.mkdir()
    _tiny_wheel(wheels_dir)
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    manifest = {"python_version": here, "requirements": ["lm-carried-probe==0.1", "no-such-distribution-here>=1"]}
    (wheels_dir / wheels.MANIFEST).write_text(json.dumps(manifest))
    env = gpu_check.child_env(True, None)
    log = tmp_path / "install.log"
    phase, python = gpu_check.install(wheels_dir, tmp_path / "venv", env, log, timeout=240)
    assert phase.ok, log.read_text()[-2000:]
    assert phase.detail["mode"].startswith("carried wheels as they are") and phase.detail["imports"] == "ok"
    assert phase.detail["resolve_exit_code"] != 0 and "--no-deps" in phase.command
    done = subprocess.run([str(python), "-c", "import lm_carried_probe"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
