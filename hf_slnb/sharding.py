"""How a layer's parameters are laid out across data-parallel ranks: chosen once per layer.

* :class:`Whole`: unsharded (single process or DDP): the bank's stacks are the layers.
* :class:`Rows`: FSDP2 dim-0 shards that are whole output rows (``nn.Linear``, ungrouped
  convolutions with the diagonal direction): the rows share the layer's metric, so each rank
  solves its own; inner products are summed over the shards.
* :class:`Gathered`: any other sharded layer (``Conv1D`` and embeddings, whose dim-0 shards are
  input features; PCG across features; matrix-free products): every rank gathers the layer's
  gradient, solves it whole and keeps its shard of the result.

A direction whose map does not split by rows (an orthogonalisation) calls ``solve_whole``: every
sharded layout then gathers the layer, as Muon does under FSDP2.

A sharded layer is a bank of its own (a stack of one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from . import distributed
from .functional import Stack, stacked_dot

if TYPE_CHECKING:
    from .layers import Bank, Neuron


class Whole:
    """Unsharded layers."""

    sharded = False

    def __init__(self, group: object | None = None) -> None:
        self.group = group

    def inner(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return stacked_dot(a, b)

    def solve(self, bank: Bank, g: Stack, fn: Callable[[Stack], Stack]) -> Stack:
        """``fn`` (a solve that splits by output rows) on this rank's stacks ``g``."""
        return fn(g)

    def solve_whole(self, bank: Bank, g: Stack, fn: Callable[[Stack], Stack]) -> Stack:
        """``fn`` (any map of a whole layer) on the layer's stacks: gathered when sharded, and
        this rank's shard of the result kept."""
        if not self.sharded:
            return fn(g)
        return _keep_shard(bank, fn(_gather(bank, g)))

    def gather(self, bank: Bank, local: Stack) -> Stack:
        """The whole layer's stacks from this rank's (the identity unless gathered)."""
        return local


class Rows(Whole):
    """Dim-0 shards that are output rows: each rank solves its rows (sums over shards)."""

    sharded = True

    def inner(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        q = stacked_dot(a, b)
        distributed.all_reduce_sum([q], self.group)
        return q


class Gathered(Whole):
    """Any other sharded layer: gather the gradient, solve the whole layer, keep the shard."""

    sharded = True

    def solve(self, bank: Bank, g: Stack, fn: Callable[[Stack], Stack]) -> Stack:
        return self.solve_whole(bank, g, fn)

    def gather(self, bank: Bank, local: Stack) -> Stack:
        return _gather(bank, local)


def _owners(bank: Bank, stacks: Stack) -> list[Any]:
    """The parameters of a sharded bank's (one layer's) stacks: its weight, then its bias."""
    neuron = bank.neurons[0]
    return [neuron.weight] + ([neuron.bias] if len(stacks) == 2 else [])


def _gather(bank: Bank, local: Stack) -> Stack:
    """A sharded layer's whole stacks from this rank's shards (one all-gather per tensor)."""
    return tuple(distributed.gather_rows(t[0], p)[None]
                 for t, p in zip(local, _owners(bank, local)))


def _keep_shard(bank: Bank, whole: Stack) -> Stack:
    """This rank's shards of a sharded layer's whole stacks (no communication)."""
    return tuple(distributed.local_rows(t[0], p)[None]
                 for t, p in zip(whole, _owners(bank, whole)))


def layout_for(neuron: Neuron, diagonal_only: bool, group: object | None) -> Whole:
    """The layout of one layer's parameters (``Whole`` unless they are FSDP2 DTensors)."""
    if not distributed.is_dtensor(neuron.weight):
        return Whole(group)
    owners = [neuron.weight] + ([neuron.bias] if neuron.bias is not None else [])
    if len({distributed.local(p).shape[0] for p in owners}) == 1 and neuron.feature_axis == 1:
        ungrouped = getattr(neuron.module, "groups", 1) == 1
        if neuron.kind == "linear" or (neuron.kind == "conv" and diagonal_only and ungrouped):
            return Rows(group)
    return Gathered(group)


def shard_group(params: Sequence[Any], names: dict[int, str]) -> object | None:
    """The process group of FSDP2-sharded parameters (``None`` when nothing is sharded)."""
    groups: list[object] = []
    for p in params:
        pg = distributed.check_sharding(p, names.get(id(p), "?"))
        if pg is not None and all(pg is not g for g in groups):
            groups.append(pg)
    if len(groups) > 1:
        raise ValueError(f"Invalid params: sharded over {len(groups)} different process "
                         "groups; SLNB supports one FSDP2 mesh per optimizer.")
    return groups[0] if groups else None


__all__ = ["Gathered", "Rows", "Whole", "layout_for", "shard_group"]
