"""Data-parallel training across processes started by ``torchrun`` (torch.distributed).

The batch's streams (rows) are split across ranks. ``DistributedDataParallel``
averages the gradients across ranks (in buckets, overlapped with the backward),
which, with each rank's loss summed over time and divided by its own rows, gives
exactly the gradient of the single-process loss over the global batch. Clipping
then sees the same global norm on every rank. Dropout masks are drawn for the
global batch and cut to each rank's rows (``share``; see ``lm.model.dropout.BatchShare``),
so ranks drop different units and keep one generator state between them. Only
rank 0 logs, checkpoints and writes results.

A single process gets ``Group()`` (world size 1), for which every method is a
no-op, so the training loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lm.config import ConfigError
from lm.model.dropout import WHOLE_BATCH, BatchShare


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a [batch_size, n] stream tensor."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def share(self, batch_size: int) -> BatchShare:
        """Where this rank's rows sit in the global batch, for drawing dropout masks."""
        if not self.active:
            return WHOLE_BATCH
        return BatchShare(first_row=self.rows(batch_size).start, global_rows=batch_size)

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under ``DistributedDataParallel`` (gradients averaged across ranks in its
        backward); itself in a single process."""
        if not self.active:
            return module
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (keeps ranks stopping at the same step)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree(self, value: int) -> bool:
        """Whether every rank holds the same ``value`` (collective): max(v) == min(v) in one all-reduce."""
        if not self.active:
            return True
        t = torch.tensor([value, -value], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) == -int(t[1])

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather_rows(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's slice along ``dim`` (the batch dimension)."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def launch_rank() -> int:
    """This process's rank as ``torchrun`` set it (0 when not launched by it), known before the
    group is joined: only rank 0 locks and clears the run folder."""
    return int(os.environ.get("RANK", "0"))


def init_group(use_cuda: bool) -> Group:
    """Join the process group ``torchrun`` set up (nccl on GPUs, gloo on CPU), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Group()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        check_gpu_per_process(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)))
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def check_gpu_per_process(local_rank: int, local_processes: int) -> None:
    """One GPU per process: more processes on this node than visible GPUs is a config error
    (instead of CUDA's "invalid device ordinal" from some rank)."""
    gpus = torch.cuda.device_count()
    if local_rank >= gpus or local_processes > gpus:
        raise ConfigError(
            f"torchrun started {local_processes} processes on this node but {gpus} GPU(s) are visible: "
            f"use --nproc_per_node={gpus} (one process per GPU), or trainer.device=cpu"
        )
