"""make wheels: the requirement list read from pyproject.toml (torch left out) and the pip
commands that fetch or build each pinned wheel; no network."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import wheels  # noqa: E402

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]

[project]
dependencies = ["Torch==2.13.0", "hydra-core==1.3.8", "tqdm==4.70.1 ; python_version >= '3.8'"]

[project.optional-dependencies]
dev = ["pytest==9.2.0", "tqdm==4.70.1 ; python_version >= '3.8'"]
slurm = ["hydra-submitit-launcher==1.2.0"]
"""


def test_requirements_are_pyprojects_without_torch(tmp_path):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    assert wheels.requirements(tmp_path / "pyproject.toml") == [
        "hydra-core==1.3.8",
        "tqdm==4.70.1 ; python_version >= '3.8'",
        "pytest==9.2.0",
        "setuptools>=68",
    ]


def test_the_projects_requirements_hold_every_dependency_but_torch():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = wheels.requirements()
    assert not any(wheels.project_name(r) == "torch" for r in reqs)
    expected = [d for d in project["dependencies"] if wheels.project_name(d) != "torch"] + project["optional-dependencies"]["dev"]
    assert set(expected) <= set(reqs) and any(r.startswith("pytest") for r in reqs)


@pytest.mark.parametrize(
    "text, name",
    [
        ("Hydra_Core==1.3", "hydra-core"),
        ("zope.interface>=5", "zope-interface"),
        ("torch", "torch"),
        (" tqdm ; python_version>'3'", "tqdm"),
    ],
)
def test_project_name_is_normalized(text, name):
    assert wheels.project_name(text) == name


def test_binary_pins_are_fetched_for_the_target_and_source_only_ones_built():
    resolved = [
        {"name": "numpy", "version": "2.4.6", "wheel": True},
        {"name": "antlr4-python3-runtime", "version": "4.9.3", "wheel": False},
        {"name": "torch", "version": "2.13.0", "wheel": True},
        {"name": "pyarrow", "version": "26.0.1", "wheel": True},
    ]
    fetch, build = wheels.download_commands(resolved, Path("w"), ["pip"], "3.12", excluded=("torch", "pyarrow"))
    assert fetch[:2] == ["pip", "download"] and fetch[-1:] == ["numpy==2.4.6"]
    for flag in ("--no-deps", "--only-binary=:all:", "manylinux2014_x86_64", "3.12", "cp312"):
        assert flag in fetch
    assert build == ["pip", "wheel", "--no-deps", "--wheel-dir", "w", "antlr4-python3-runtime==4.9.3"]


def test_the_gpu_profile_needs_no_datasets_and_fetches_only_what_the_image_lacks(tmp_path):
    """datasets 5 needs pyarrow >= 24 (about 50 MB, left out of the carried wheels): if the GPU machine's
    pyarrow is older the install fails and nothing runs. The GPU install asks for no datasets at all
    (the corpus is read with plain Python there) and carries wheels of hydra and omegaconf only."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.replace('"hydra-core==1.3.8"', '"hydra-core==1.3.8", "datasets>=2.19"'))
    assert wheels.gpu_requirements(tmp_path / "pyproject.toml") == [
        "hydra-core==1.3.8",
        "tqdm==4.70.1 ; python_version >= '3.8'",
        "pytest==9.2.0",
    ]
    reqs = wheels.gpu_requirements()
    names = {wheels.project_name(r) for r in reqs}
    assert {"hydra-core", "omegaconf", "pytest"} <= names and not names & {"datasets", "torch", "ruff", "pyarrow"}
    resolved = [
        {"name": "hydra-core", "version": "1.3.8", "wheel": True},
        {"name": "antlr4-python3-runtime", "version": "4.9.3", "wheel": False},
        {"name": "numpy", "version": "2.4.6", "wheel": True},
    ]
    image_has = tuple(d["name"] for d in resolved if d["name"] not in wheels.GPU_IMAGE_LACKS)
    fetch, build = wheels.download_commands(resolved, Path("w"), ["pip"], "3.12", excluded=("torch", *image_has))
    assert fetch[-1:] == ["hydra-core==1.3.8"] and build[-1:] == ["antlr4-python3-runtime==4.9.3"]
