"""Data-parallel helpers on ``torch.distributed``, with single-process fallbacks.

SLNB's statistics must cover the global batch: every rank sums its captured moments, and the
sum is all-reduced. Small tensors are packed into one flat buffer per dtype so a step costs one
collective per dtype, not one per layer. FSDP2's sharded parameters (DTensors sharded along dim 0
on a 1-D mesh) are handled with the helpers at the end: local shards, gathers and slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:
    try:  # torch before 2.5 kept it private; SLNB refuses such parameters (check_sharding)
        from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
    except ImportError:  # torch built without distributed support
        DTensor = None  # type: ignore[assignment,misc]

#: The oldest torch whose FSDP2 (``torch.distributed.fsdp.fully_shard``) SLNB supports.
FSDP2_MIN_TORCH = (2, 6)


def world_size(group: object | None = None) -> int:
    """Number of data-parallel processes (1 when ``torch.distributed`` is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)  # type: ignore[arg-type]


def rank(group: object | None = None) -> int:
    """This process's rank in ``group`` (0 when ``torch.distributed`` is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)  # type: ignore[arg-type]


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


def share(total: int, group: object | None = None) -> slice:
    """This rank's contiguous share of ``total`` rows (``torch.chunk``'s split; may be empty)."""
    world = world_size(group)
    if world == 1:
        return slice(0, total)
    chunk = -(-total // world)
    lo = min(rank(group) * chunk, total)
    return slice(lo, min(lo + chunk, total))


def _padded(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended up to ``rows`` (collectives need equal sizes)."""
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def all_gather_shares(mine: Tensor, total: int, group: object | None = None) -> Tensor:
    """The ``total`` rows whose :func:`share` each rank holds (``mine``), on every rank: one
    all-gather (shares padded to equal size)."""
    world = world_size(group)
    if world == 1:
        return mine
    chunk = -(-total // world)
    padded = _padded(mine, chunk)
    out = mine.new_empty((world * chunk,) + tuple(mine.shape[1:]))
    dist.all_gather(list(out.chunk(world)), padded, group=group)  # type: ignore[arg-type]
    return out[:total]


# ---------------------------------------------------------------------------------------------
# Fully sharded parameters (FSDP2's DTensors, sharded along dim 0 on a 1-D mesh)
# ---------------------------------------------------------------------------------------------
def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def check_sharding(p: Tensor, name: str) -> object | None:
    """The process group of a parameter sharded as FSDP2 shards it (``None`` if unsharded).

    Raises ``ValueError`` for any other layout (2-D meshes as in HSDP, tensor parallelism,
    custom shard placements): SLNB's per-row maths assumes dim-0 shards over one group.
    """
    if not is_dtensor(p):
        return None
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < FSDP2_MIN_TORCH:
        raise ValueError(
            f"Invalid parameter {name!r}: a DTensor (sharded parameter) under torch "
            f"{torch.__version__}; SLNB supports sharded parameters (FSDP2) from torch "
            f"{'.'.join(map(str, FSDP2_MIN_TORCH))} on. Upgrade torch or train without sharding.")
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)  # type: ignore[attr-defined]
    if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard \
            or placements[0].dim != 0:
        raise ValueError(
            f"Invalid sharding of parameter {name!r}: placements {placements} on a "
            f"{mesh.ndim}-D device mesh. SLNB supports unsharded parameters and FSDP2's "
            "(fully_shard) dim-0 shards on a 1-D mesh (Shard(0)); not HSDP, tensor parallelism "
            "or custom shard placements.")
    return mesh.get_group()


def shard_range(p: Tensor) -> tuple[int, int] | None:
    """Rows ``lo:hi`` of a dim-0 sharded DTensor held by this rank (``None`` if not laid out
    as ``torch.chunk`` lays it out, which is how ``Shard(0)`` and FSDP2 split a tensor)."""
    n, ranks = p.shape[0], p.device_mesh.size()  # type: ignore[attr-defined]
    chunk = -(-n // ranks)
    lo = min(p.device_mesh.get_local_rank() * chunk, n)  # type: ignore[attr-defined]
    hi = min(lo + chunk, n)
    return (lo, hi) if hi - lo == local(p).shape[0] else None


def gather_rows(shard: Tensor, like: Tensor) -> Tensor:
    """The full tensor whose dim-0 shards (laid out as DTensor ``like``) are ``shard``."""
    return DTensor.from_local(shard, like.device_mesh, like.placements,  # type: ignore[attr-defined]
                              shape=like.shape, stride=like.stride()).full_tensor()


def _global(group: object | None, rank: int) -> int:
    """The global rank of ``group``'s rank ``rank``."""
    return dist.get_global_rank(group or dist.group.WORLD, rank)  # type: ignore[arg-type]


def gather_rows_to(shard: Tensor, like: Tensor, owner: int, group: object | None) -> Tensor | None:
    """The full tensor whose dim-0 shards (laid out as DTensor ``like``) are ``shard``, on rank
    ``owner`` of ``group`` only (``None`` on the others): one gather of equal, padded shards."""
    world, n = world_size(group), like.shape[0]
    chunk = -(-n // world)
    padded = _padded(shard, chunk)
    mine = rank(group) == owner
    out = shard.new_empty((world * chunk,) + tuple(shard.shape[1:])) if mine else None
    dist.gather(padded, list(out.chunk(world)) if out is not None else None,
                dst=_global(group, owner), group=group)  # type: ignore[arg-type]
    return out[:n] if out is not None else None


def scatter_rows_from(full: Tensor | None, like: Tensor, owner: int, group: object | None,
                      template: Tensor) -> Tensor:
    """This rank's dim-0 shard (laid out as DTensor ``like``) of ``full``, which rank ``owner``
    of ``group`` holds (``None`` on the others; ``template`` gives dtype and trailing shape):
    one scatter of equal, padded shards."""
    world, n = world_size(group), like.shape[0]
    chunk = -(-n // world)
    rest = tuple(template.shape[1:])
    out = template.new_empty((chunk,) + rest)
    pieces = None
    if full is not None:
        pieces = list(_padded(full, world * chunk).chunk(world))
    dist.scatter(out, pieces, src=_global(group, owner), group=group)  # type: ignore[arg-type]
    return out[: local(like).shape[0]]


def broadcast_from(t: Tensor, owner: int, group: object | None) -> None:
    """``t`` of rank ``owner`` of ``group`` on every rank, in place."""
    dist.broadcast(t, src=_global(group, owner), group=group)  # type: ignore[arg-type]


def local_rows(full: Tensor, like: Tensor) -> Tensor:
    """This rank's dim-0 shard of ``full``, laid out as DTensor ``like`` (no communication)."""
    rows = shard_range(like)
    if rows is None:
        raise RuntimeError(f"SLNB: the local shard {tuple(local(like).shape)} of a parameter "
                           f"of shape {tuple(like.shape)} is not a torch.chunk row block.")
    return full[rows[0]:rows[1]]
