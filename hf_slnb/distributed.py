"""Data-parallel helpers on ``torch.distributed``, with single-process fallbacks.

SLNB's statistics must cover the global batch: every rank sums its captured moments, and the
sum is all-reduced. Small tensors are packed into one flat buffer per dtype so a step costs one
collective per dtype, not one per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def world_size(group: object | None = None) -> int:
    """Number of data-parallel processes (1 when ``torch.distributed`` is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)  # type: ignore[arg-type]


def all_reduce_sum(tensors: Sequence[Tensor], group: object | None = None) -> None:
    """Sum each tensor over all ranks, in place, with one collective per dtype and device."""
    if world_size(group) == 1 or not tensors:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for same in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
        offset = 0
        for t in same:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
