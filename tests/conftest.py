"""Shared fixtures: tiny synthetic corpora, the real PTB folder, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lm import kernels

from helpers import write_corpus


@pytest.fixture(params=["fused", "pytorch"])
def backend(request, monkeypatch):
    """A test of a cell's own loop, run on the compiled kernels and on the plain PyTorch fallback
    (CI has a compiler: there the kernels must build)."""
    if request.param == "fused":
        if kernels.fused() is None:
            if os.environ.get("CI") == "true":
                pytest.fail("the fused kernels did not build in CI")
            pytest.skip("no compiler here: the fused kernels are unavailable")
    else:
        monkeypatch.setattr(kernels, "available", lambda device: False)
    return request.param


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def shared_tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    """The real PTB from $LM_DATA_DIR; a failure (not a skip) where CI promises the data."""
    folder = os.environ.get("LM_DATA_DIR")
    required = os.environ.get("CI") == "true" or os.environ.get("LM_REQUIRE_DATA") == "1"
    if not folder or not (Path(folder) / "ptb.train.txt").exists():
        message = f"real PTB not found (LM_DATA_DIR={folder!r}): point LM_DATA_DIR at a folder with ptb.*.txt"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    return Path(folder)


@pytest.fixture(autouse=True)
def _no_data_env_leak(monkeypatch, request):
    """Unit tests must not pick up $LM_DATA_DIR by accident; the ptb tests read it explicitly."""
    if "ptb_dir" not in request.fixturenames:
        monkeypatch.delenv("LM_DATA_DIR", raising=False)
