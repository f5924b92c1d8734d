"""Wheels of every dependency but torch, for an offline Linux x86_64 CPython 3.11 GPU machine: ``make wheels``.

A GPU machine that cannot reach a package index already has torch built for its CUDA; it
needs the rest. The list comes from pyproject.toml (the dependencies, the dev extra for
pytest, and the build requirements, since torch's cpp_extension imports setuptools), minus
torch. pip resolves that list once here, under constraints.txt (the versions CI tested), then
each pinned distribution is fetched as a wheel
for the target platform; the few that publish only a source archive (antlr4-python3-runtime,
which hydra-core needs) are built into wheels here. ``make gpu-check`` installs the folder
with ``pip install --no-index --find-links``.

``--gpu`` makes the small folder the lent GPU machines need (``make gpu-check``,
``make gpu-table1``): the requirements of training, evaluation and ``pytest -m cuda``
(``gpu_requirements``: no ``datasets``, whose pyarrow alone is about 50 MB and must be >= 24,
since the corpus is then read with plain Python; no ruff, no launchers), and wheels only of
the distributions that machine's image lacks (``GPU_IMAGE_LACKS``): under a megabyte, where
the whole list is about 130 MiB against a 64 MiB limit on what travels with a job.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"  # the exact versions CI installs: the wheels are those
EXCLUDED = ("torch",)  # the GPU machine's own CUDA build
EXTRAS = ("dev",)  # pytest, and the launchers the tests import
PYTHON_VERSION = "3.11"  # pyproject's; the lent H200's python3 is 3.12 (--python-version 3.12)
MANIFEST = "wheels.json"  # what the folder was made for: make gpu-check refuses another Python with one line
# --gpu: what a GPU machine's commands import beyond torch. datasets stays out (lm.data.corpus reads the
# files with plain Python without it); so do the lint and launcher extras.
GPU_LEFT_OUT = ("torch", "datasets")
GPU_EXTRA_NEEDS = ("pytest",)  # of the dev extra: make gpu-check runs pytest -m cuda
# Of those, what the lent GPU image ('cuda', read 2026-11-17: docs/gpu.md) does not hold: the rest is there.
GPU_IMAGE_LACKS = ("hydra-core", "omegaconf", "antlr4-python3-runtime")
# glibc 2.17 or newer (manylinux2014, which also admits manylinux2010/1) and 2.28 or newer (wheels built
# on AlmaLinux 8): every GPU distribution of recent years has glibc >= 2.28
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")


def project_name(requirement: str) -> str:
    """The normalized name of a requirement string (PEP 503): ``Hydra_Core==1.3`` -> ``hydra-core``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(
    pyproject: Path = REPO / "pyproject.toml", extras: tuple[str, ...] = EXTRAS, excluded: tuple[str, ...] = EXCLUDED
) -> list[str]:
    """pyproject's dependencies, the ``extras`` and the build requirements, without ``excluded``
    (by name, whatever their pins), each once, in the file's order."""
    data = tomllib.loads(pyproject.read_text())
    project = data.get("project", {})
    listed = list(project.get("dependencies", []))
    for extra in extras:
        listed += project.get("optional-dependencies", {}).get(extra, [])
    listed += data.get("build-system", {}).get("requires", [])
    drop = {project_name(name) for name in excluded}
    out: list[str] = []
    for requirement in listed:
        if project_name(requirement) not in drop and requirement not in out:
            out.append(requirement)
    return out


def gpu_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """What a GPU machine installs: pyproject's dependencies without ``GPU_LEFT_OUT``, plus the dev
    extra's ``GPU_EXTRA_NEEDS`` (no build requirements: nothing is built there), each once."""
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    drop = {project_name(name) for name in GPU_LEFT_OUT}
    listed = [r for r in project.get("dependencies", []) if project_name(r) not in drop]
    listed += [r for r in project.get("optional-dependencies", {}).get("dev", []) if project_name(r) in GPU_EXTRA_NEEDS]
    return list(dict.fromkeys(listed))


def resolve(reqs: list[str], pip: list[str]) -> list[dict]:
    """Every distribution the install of ``reqs`` takes, resolved by pip on this machine without
    installing anything: [{name, version, wheel}], ``wheel`` false where only a source archive exists."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pinned = ["-c", str(CONSTRAINTS)] if CONSTRAINTS.is_file() else []
        _run([*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *pinned, *reqs])
        items = json.loads(report.read_text())["install"]
    return [
        {
            "name": project_name(i["metadata"]["name"]),
            "version": i["metadata"]["version"],
            "wheel": i["download_info"]["url"].endswith(".whl"),
        }
        for i in items
    ]


def download_commands(
    resolved: list[dict], dest: Path, pip: list[str], python_version: str = PYTHON_VERSION, excluded: tuple[str, ...] = EXCLUDED
) -> list[list[str]]:
    """pip commands that put a wheel of each resolved pin but ``excluded`` into ``dest``: binary ones
    fetched for the target platform and Python, source-only ones built here (pure Python, so the
    wheel runs anywhere)."""
    drop = {project_name(name) for name in excluded}
    pins = {
        wheel: [f"{d['name']}=={d['version']}" for d in resolved if d["wheel"] == wheel and d["name"] not in drop]
        for wheel in (True, False)
    }
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    commands = []
    if pins[True]:
        commands.append(
            [
                *pip,
                "download",
                "--no-deps",
                "--only-binary=:all:",
                *platforms,
                "--python-version",
                python_version,
                "--implementation",
                "cp",
                "--abi",
                "cp" + python_version.replace(".", ""),
                "--dest",
                str(dest),
                *pins[True],
            ]
        )
    if pins[False]:
        commands.append([*pip, "wheel", "--no-deps", "--wheel-dir", str(dest), *pins[False]])
    return commands


def check_this_machine() -> None:
    """pip resolves environment markers for the machine it runs on: it must be Linux x86_64 like the target."""
    if (sys.platform, platform.machine()) != ("linux", "x86_64"):
        raise SystemExit(
            f"error: make wheels resolves for the machine it runs on: run it on Linux x86_64 "
            f"(this is {sys.platform} {platform.machine()})"
        )


def _run(command: list[str]) -> None:
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:6])} ... failed (its message is above)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default="wheels", help="the folder to fill (default wheels/)")
    parser.add_argument("--python-version", default=PYTHON_VERSION, help=f"the GPU machine's CPython (default {PYTHON_VERSION})")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="only what the lent GPU machines need and their image lacks (under 1 MB; see docs/gpu.md)",
    )
    parser.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        metavar="NAME",
        help="also leave out these distributions (ones the GPU machine already has, to carry less)",
    )
    args = parser.parse_args(argv)
    check_this_machine()
    pip = [sys.executable, "-m", "pip"]
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    reqs = gpu_requirements() if args.gpu else requirements()
    left_out = GPU_LEFT_OUT if args.gpu else EXCLUDED
    print(f"resolving {len(reqs)} requirements from pyproject.toml (without {', '.join(left_out)})")
    resolved = resolve(reqs, pip)
    excluded = (*EXCLUDED, *args.exclude)
    if args.gpu:  # everything the image already holds
        excluded += tuple(d["name"] for d in resolved if d["name"] not in GPU_IMAGE_LACKS)
    for command in download_commands(resolved, dest, pip, args.python_version, excluded):
        _run(command)
    manifest = {
        "python_version": args.python_version,
        "profile": "gpu" if args.gpu else "full",
        "platforms": list(PLATFORMS),
        "requirements": reqs,  # what make gpu-check asks pip for
        "excluded": list(excluded),
        "resolved": [f"{d['name']}=={d['version']}" for d in resolved],
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{dest}: {len(wheels)} wheels, {size:.0f} MiB, for CPython {args.python_version} (left out: {', '.join(excluded)})")


if __name__ == "__main__":
    main()
