"""Streams and windows: a split's 1-D id tensor cut into ``batch_size`` rows, then into
truncated-BPTT windows of inputs and next-word targets."""

from __future__ import annotations

import torch

from lm.infra.errors import DataError


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D stream into ``batch_size`` contiguous rows, dropping the tail.

    ids = [0 1 2 3 4 5 6 7 8 9 10], batch_size = 3  ->  [[0 1 2]
                                                        [3 4 5]
                                                        [6 7 8]]
    Row r continues where row r-1 would have, so a hidden state carried along a
    row always sees text in order.
    """
    if ids.dim() != 1:
        raise ValueError("batchify expects a 1-D tensor of ids")
    n = ids.numel() // batch_size
    if n < 2:
        raise DataError(
            f"a split of {ids.numel()} tokens is too short for batch size {batch_size}: each row needs at least 2 tokens: "
            "lower data.batch_size"
        )
    return ids[: n * batch_size].view(batch_size, n)


def bptt_windows(data: torch.Tensor, bptt: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and next-word targets, ``bptt`` columns at a time.

    data = [[0 1 2 3 4]      bptt = 2  ->  x [[0 1] [5 6]], y [[1 2] [6 7]]
            [5 6 7 8 9]]                   x [[2 3] [7 8]], y [[3 4] [8 9]]
    Every column but the first is a target exactly once; the last window may
    be shorter. The tensors are views: no copy, no Python work per token.
    """
    n = data.size(1)
    windows = []
    for start in range(0, n - 1, bptt):
        length = min(bptt, n - 1 - start)
        windows.append((data[:, start : start + length], data[:, start + 1 : start + 1 + length]))
    return windows
