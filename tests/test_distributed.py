"""Data-parallel training with torchrun (gloo on CPU) is single-process training, dropout included:
every rank draws each mask for the global batch and keeps its own rows (lm.model.dropout.BatchShare)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.config import ConfigError
from lm.engine.distributed import Group, check_gpu_per_process
from lm.engine.epochs import STOP_CHECK_EVERY
from lm.engine.step import EpochLoop
from lm.engine.training import train
from lm.infra.checkpoint import load_checkpoint

from helpers import REPO, tiny_overrides, train_config

VARIATIONAL = (
    "model.dropout_variant=variational",
    "model.dropout_embedding=0.1",
    "model.dropout_input=0.2",
    "model.dropout_recurrent=0.2",
    "model.dropout_output=0.2",
)


def _torchrun(overrides: list[str], run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "LM_FAULT")}
    if fault:
        env["LM_FAULT"] = fault
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lm.train",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = load_checkpoint(a_path)["model"], load_checkpoint(b_path)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.slow
@pytest.mark.parametrize("variant", [("model.dropout=0.3",), VARIATIONAL], ids=["zaremba", "variational"])
def test_two_gloo_processes_with_dropout_match_one_process(tiny_corpus: Path, tmp_path: Path, variant: tuple[str, ...]):
    """With dropout on: the ranks' masks are two halves of the one-process masks, so the runs agree
    to the rounding of the gradient all-reduce (different masks per rank, the same global draw)."""
    overrides = tiny_overrides(tiny_corpus, *variant, "trainer.epochs=2", "trainer.max_steps=60")
    result = _torchrun(overrides, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    single = train(train_config(overrides), tmp_path / "single")
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["processes"] == 2 and ddp["steps"] == single["steps"] == 60
    _assert_same_weights(tmp_path / "single" / "checkpoint.pt", tmp_path / "ddp" / "checkpoint.pt")
    assert ddp["epochs"][0]["train_ppl"] == pytest.approx(single["epochs"][0]["train_ppl"], rel=1e-5)
    assert ddp["valid_ppl"] == pytest.approx(single["valid_ppl"], rel=1e-4)
    assert ddp["test_ppl"] == pytest.approx(single["test_ppl"], rel=1e-4)


@pytest.mark.slow
def test_a_stopped_two_process_run_resumes_in_one_process_as_if_never_split(tiny_corpus: Path, tmp_path: Path):
    """SIGTERM mid-epoch under torchrun (both ranks stop at the same step), then one process continues
    from rank 0's checkpoint (one RNG state for all ranks) and ends where an uninterrupted run ends."""
    overrides = tiny_overrides(tiny_corpus, "model.dropout=0.3", "trainer.epochs=1", "trainer.max_steps=60")
    run_dir = tmp_path / "split"
    stopped = _torchrun(overrides, run_dir, fault="step:25:TERM")
    assert stopped.returncode != 0 and "stopped by SIGTERM in epoch 1" in stopped.stderr, stopped.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert 25 <= ckpt["step"] <= 25 + 20 and ckpt["partial_epoch"]  # within one stop check of the signal
    resumed = train(train_config([*overrides, "trainer.resume=auto"]), run_dir)
    single = train(train_config(overrides), tmp_path / "single")
    assert resumed["steps"] == single["steps"] == 60 and resumed["sessions"] == 2
    _assert_same_weights(tmp_path / "single" / "checkpoint.pt", run_dir / "checkpoint.pt")
    assert resumed["test_ppl"] == pytest.approx(single["test_ppl"], rel=1e-4)


def test_ranks_check_for_a_stop_every_few_steps_not_every_step():
    """The stop check is a collective with a host sync under torchrun: asked every ``stop_every`` steps."""
    every = STOP_CHECK_EVERY  # what a torchrun run uses
    assert every > 1
    asked = []
    loop = EpochLoop(should_stop=lambda: asked.append(1) or False, stop_every=every)
    assert all(loop.keeps_going(step) for step in range(5 * every))
    assert len(asked) == 5  # steps 0, every, 2 every, ...
    stopping = EpochLoop(should_stop=lambda: True, stop_every=every)
    assert stopping.keeps_going(every - 1) and not stopping.keeps_going(every)


def test_a_rank_gets_its_rows_of_every_mask():
    group = Group(rank=1, world_size=4)
    share = group.share(20)
    assert (share.first_row, share.global_rows) == (5, 20) and group.rows(20) == slice(5, 10)
    assert not Group().share(20).partial


def test_more_processes_than_gpus_is_one_line_not_invalid_device_ordinal(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpu_per_process(1, 2)  # fine: one GPU each
    with pytest.raises(ConfigError, match=r"started 4 processes on this node but 2 GPU\(s\) are visible: use --nproc_per_node=2"):
        check_gpu_per_process(3, 4)
    with pytest.raises(ConfigError, match="started 4 processes"):
        check_gpu_per_process(0, 4)  # rank 0 refuses too, before the others fail


def _agree_in_two_processes(rank: int, store_file: str, values: list[int], out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        result = Group(rank=rank, world_size=2).agree(values[rank])
        Path(f"{out_file}.{rank}").write_text(str(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("values, agreed", [([7, 7], True), ([7, 8], False), ([2**62, -(2**62)], False)])
@pytest.mark.full
def test_ranks_agree_only_on_one_value(tmp_path: Path, values: list[int], agreed: bool):
    """The check behind one saved RNG state for all ranks: every rank learns whether all hold the same value."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_in_two_processes, args=(str(tmp_path / "store"), values, str(tmp_path / "out")), nprocs=2)
    assert [(tmp_path / f"out.{r}").read_text() for r in (0, 1)] == [str(agreed)] * 2
