"""The collectives one step needs across workers, each a no-op in one process (no process group).

Every rank must make the same collective calls in the same order: `aligned` pads a rank's micro-batches
with placeholders up to the largest count of any rank, `gather_rows` gathers AOT's values in rank order and
`all_reduce_sum` adds the metric sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["aligned", "all_reduce_sum", "distributed", "gather_rows"]


def all_reduce_sum(t: Tensor) -> Tensor:
    import torch.distributed as dist

    if distributed():
        dist.all_reduce(t)
    return t


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def gather_rows(rows: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows (float64, any count per rank) concatenated in rank order, and where this rank's
    rows start in it."""
    if not distributed():
        return rows, 0
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows.cpu())
    return torch.cat(parts), sum(len(p) for p in parts[: dist.get_rank()])


def aligned(groups: list[list[int]], device: torch.device) -> list[list[int] | None]:
    """`groups` padded with None up to the largest micro-batch count of any rank.

    Every rank must run the same number of forwards: FSDP all-gathers parameters in each one, and a rank
    that stopped early would leave the others waiting forever (a rank's share of an eval batch can be
    empty, and token budgets split different pairs differently).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(groups)
    n = torch.tensor([len(groups)], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return [*groups, *([None] * (int(n.item()) - len(groups)))]
