"""Data-parallel training across processes started by ``torchrun`` (torch.distributed).

The batch's streams (rows) are split across ranks; after each backward the
gradients are averaged across ranks, which, with each rank's loss summed over
time and divided by its own rows, gives exactly the gradient of the
single-process loss over the global batch. Clipping then sees the same global
norm on every rank. Only rank 0 logs, checkpoints and writes results.

A single process gets ``Group()`` (world size 1), for which every method is a
no-op, so the training loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (keeps ranks stopping at the same step)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

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
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
