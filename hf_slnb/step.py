"""One step's working set: what the direction and the step rule read and write.

:class:`StepContext` holds, for every slab of every arena, the bias-corrected momentum ``g`` and
the direction ``h`` (stacks), the masks of the step (parameters stepped now, the non-finite
skip) and the banks' statistics, and offers the few reductions the rules need. It is built and
used inside ``SLNB.step`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .functional import (
    Stack,
    bias_correction,
    cpu_path,
    fold_statistics_,
    per_layer,
    preconditioner_terms,
)
from .layers import Bank
from .slabs import Arena, Slab


@dataclass
class Statistics:
    """A bank's statistics this step: bias-corrected ``mu``, ``nu`` ``(L, d)``, the reciprocal
    preconditioner denominators ``inv``, the ``(L,)`` mask of layers with input, ``n_out``."""

    mu: Tensor
    nu: Tensor
    inv: Tensor
    active: Tensor
    n_out: Tensor


@dataclass
class Folded:
    """A bank's EMAs once this step's sums are folded in (:meth:`StepContext.fold`): the
    ``(L,)`` mask of layers with input and ``n_out``."""

    active: Tensor
    n_out: Tensor


class StepContext:
    """Per-step working set (see the module docstring).

    Args:
        arenas: The arenas of the parameters.
        banks: The layers' banks (those laid out as banks in the arenas are used).
        stepped: Ids of the parameters with a gradient this step.
        live: 0-d bool on each device: false when the step is skipped (non-finite values).
        groups: Parameter id -> its parameter group.
        counts: Bank id -> ``(L,)`` input and ``(L,)`` output positions (on the device).
        shard_group: The FSDP2 process group (``None`` if nothing is sharded).
        data_group: The data-parallel process group (``None``: the default group, if any).
        index: The optimizer's count of steps taken before this one.
    """

    def __init__(self, arenas: list[Arena], banks: list[Bank], stepped: frozenset[int],
                 live: Tensor, groups: dict[int, dict[str, Any]],
                 counts: dict[int, tuple[Tensor, Tensor]], shard_group: object | None,
                 data_group: object | None = None, index: int = 0) -> None:
        self.arenas, self.live = arenas, live
        self.groups, self.counts, self.shard_group = groups, counts, shard_group
        self.data_group = data_group
        self.slabs: list[Slab] = [s for a in arenas for s in a.slabs]
        self.g: dict[int, Tensor] = {}
        self.h: dict[int, Tensor] = {}
        self.preconditioned: dict[int, Tensor] = {}
        #: Slabs whose direction a step rule that copies directions (``orth``) grafts to Adam's
        #: length per output row instead (``orth_rest='diagonal'``).
        self.grafted: set[int] = set()
        #: Weight slabs whose direction the step rule takes as it is (``orth``): the direction
        #: may write it straight into the slab's update buffer (:meth:`direct_out`).
        self.taken_as_is: frozenset[int] = frozenset()
        self.residuals: list[Tensor] = []
        self.diagnostics: dict[str, Tensor | float] = {}
        self._stats: dict[int, Statistics] = {}
        self._folded: dict[int, Folded] = {}
        self._slab_of: dict[int, tuple[Slab, Slab | None]] = {}
        self._row_dims: dict[int, tuple[int, ...]] = {}
        self._bank_of_slab: dict[int, Bank] = {}
        for arena in arenas:
            per, elem = arena.live(frozenset(i for i in stepped if i in arena.index))
            arena.uniform = arena.uniform and per is None
            keep = live.to(arena.device)
            arena.live_elements = keep if elem is None else elem & keep
            arena.live_params = keep if per is None else per & keep
            # On the CPU, where reading a flag waits for nothing, a step in which every
            # parameter is live skips the masks' passes over the whole arena (gpt2-10m: 24 ms
            # of a 320 ms whitened step()). Accelerators always mask: they never wait on a flag.
            arena.all_live = bool(elem is None and cpu_path(keep.device) and keep.all())
        self.banks: list[Bank] = []
        for bank in banks:  # those laid out as a bank (the others' layers take the identity)
            w = bank.neurons[0].weight
            arena = next((a for a in arenas if id(w) in a.index), None)
            if arena is None or arena.slab_of[id(w)].key[:2] != ("bank", id(bank)):
                continue
            self.banks.append(bank)
            ws = arena.slab_of[id(w)]
            b = bank.neurons[0].bias
            bs = arena.slab_of.get(id(b)) if bank.has_bias and b is not None else None
            bs = bs if bs is not None and bs.key[:2] == ws.key[:2] else None
            self._slab_of[id(bank)] = (ws, bs)
            self._row_dims[id(ws)] = bank.neurons[0].row_dims
        self.captured = {id(b): b.all_captured() for b in self.banks}
        #: The optimizer's count of steps taken before this one (a host number).
        self.index = index

    def take_all(self, bank: Bank) -> None:
        """Every layer of ``bank`` takes its direction this step, captured or not (a direction
        that reads no input this step: ``cov_every``)."""
        self.captured[id(bank)] = True

    # -- momentum --------------------------------------------------------------------------------
    def momentum(self) -> None:
        """Fold the (sanitised) gradients into the momenta; set ``g`` of every slab.

        ``m <- m + (1 - beta) (grad - m)`` where the step is live and the parameter has a
        gradient, else ``m`` stays bit for bit; ``g = m / (1 - beta^t)`` per parameter, written
        over the gradient scratch (whose raw values are no longer needed).
        """
        for arena in self.arenas:
            m, grad = arena.buffers["momentum_buffer"], arena.grad
            arena.steps.add_(arena.live_params)
            if not arena.all_live:
                torch.where(arena.live_elements, grad, m, out=grad)
            if len(set(arena.beta_values)) == 1:
                m.lerp_(grad, 1.0 - arena.beta_values[0])
            else:
                for s in arena.slabs:
                    s.stack(m).lerp_(s.stack(grad), 1.0 - arena.beta_values[s.lo])
            if arena.uniform:  # one step count and one beta: one scalar for the whole arena
                bc = bias_correction(arena.beta_values[0], arena.step0).to(arena.dtype)
                torch.div(m, bc, out=grad)
            else:
                bc = torch.pow(arena.betas, torch.clamp(arena.steps, min=1.0)).neg_().add_(1.0)
                for s, rows in zip(arena.slabs, self.split(arena, bc)):
                    torch.div(s.stack(m), per_layer(rows, s.stack(m)), out=s.stack(grad))
            for s in arena.slabs:
                self.g[id(s)] = self.h[id(s)] = s.stack(grad)

    def split(self, arena: Arena, vec: Tensor) -> tuple[Tensor, ...]:
        """A per-parameter vector ``(P,)`` as each slab's ``(L,)`` rows, in the arena's dtype
        (one cast and one split for the whole arena)."""
        return torch.split(vec.to(arena.dtype), [len(s.params) for s in arena.slabs])

    # -- banks -------------------------------------------------------------------------------------
    def bank_slabs(self, bank: Bank) -> list[Slab]:
        """The bank's weight slab and, if it has biases, their slab."""
        return [s for s in self._slab_of[id(bank)] if s is not None]

    def bank_grads(self, bank: Bank) -> Stack:
        ws, bs = self._slab_of[id(bank)]
        return (self.g[id(ws)],) if bs is None else (self.g[id(ws)], self.g[id(bs)])

    def group_of_bank(self, bank: Bank) -> dict[str, Any]:
        return self.groups[id(bank.neurons[0].weight)]

    def fold(self, bank: Bank) -> Folded:
        """The bank's EMAs updated with this step's sums (once per step: the first call), and
        the mask of its layers with input. What a direction reads that needs no preconditioner
        terms (``whitened_orth``); :meth:`statistics` adds them."""
        if id(bank) not in self._folded:
            count, n_out = self.counts[id(bank)]
            if bank.neurons[0].one_hot:  # one-hot inputs: the squares are the counts
                bank.sum_x2.copy_(bank.sum_x)
            elif bank.grams is not None:
                bank.squares_from_grams()  # the diagonal of the x xᵀ it keeps
            active = fold_statistics_(
                bank.stats, bank.stat_step, bank.sums, count, self.live.to(bank.device),
                bank.weights_ema, self.captured[id(bank)])
            if active.dim() == 0:
                active = active.expand(len(bank.neurons))
            else:
                active = active.reshape(-1)
            self._folded[id(bank)] = Folded(active, n_out)
        return self._folded[id(bank)]

    def statistics(self, bank: Bank) -> Statistics:
        """The bank's EMAs updated with this step's sums (:meth:`fold`) and their terms."""
        if id(bank) not in self._stats:
            folded = self.fold(bank)
            mu, nu, inv = preconditioner_terms(
                bank.stats, bank.stat_step, bank.decays, self.group_of_bank(bank)["shrinkage"],
                self._slab_of[id(bank)][1] is not None)
            self._stats[id(bank)] = Statistics(mu, nu, inv, folded.active, folded.n_out)
        return self._stats[id(bank)]

    def set_bank_direction(self, bank: Bank, h: Stack, active: Tensor) -> None:
        """Layers with input take ``h``; the others keep ``g`` (the identity metric)."""
        for slab, hh in zip(self._slab_of[id(bank)], h):
            if slab is None:
                continue
            if not self.captured[id(bank)]:  # a host fact: no mask when every layer saw input
                hh = torch.where(per_layer(active, hh), hh, self.g[id(slab)])
            self.h[id(slab)] = hh
            self.preconditioned[id(slab)] = active
            self._bank_of_slab[id(slab)] = bank

    def direct_out(self, bank: Bank) -> Tensor | None:
        """Where the bank's weight direction may be written, if the step rule takes it as it is
        (:attr:`taken_as_is`) and the weights are not sharded: the stack of the slab's update
        buffer (the rule then copies nothing). ``None`` otherwise."""
        slab = self._slab_of[id(bank)][0]
        if id(slab) not in self.taken_as_is or slab.sharded:
            return None
        return slab.stack(slab.arena.update)

    def set_slab_direction(self, bank: Bank, h: Tensor, active: Tensor) -> None:
        """The weights alone take ``h`` (the biases keep ``g``: the identity metric)."""
        slab = self._slab_of[id(bank)][0]
        if not self.captured[id(bank)]:
            h = torch.where(per_layer(active, h), h, self.g[id(slab)])
        self.h[id(slab)] = h
        self.preconditioned[id(slab)] = active
        self._bank_of_slab[id(slab)] = bank

    # -- reductions --------------------------------------------------------------------------------
    def all_captured(self, slab: Slab) -> bool:
        """Whether every layer of the slab's bank saw input (no identity rows to mask)."""
        bank = self._bank_of_slab.get(id(slab))
        return bank is not None and self.captured[id(bank)]

    def row_dims(self, slab: Slab) -> tuple[int, ...]:
        """Axes of one output row of a bank's weights; every axis for any other slab."""
        return self._row_dims.get(id(slab), tuple(range(len(slab.shape))))

    def sharded(self, slab_id: int) -> bool:
        return self.shard_group is not None and any(
            s.sharded for s in self.slabs if id(s) == slab_id)

    def reduce_sharded(self, partial: dict[Any, Tensor]) -> None:
        """Sum partial reductions of sharded slabs over the shards (one collective, in place)."""
        if partial:
            distributed.all_reduce_sum(list(partial.values()), self.shard_group)

    def mask_rows(self, slab: Slab, values: Tensor | None) -> Tensor:
        """The slab's ``(L,)`` mask of parameters stepped now (``values`` zeroed elsewhere)."""
        mask = slab.arena.live_params
        if mask.dim() == 0:
            return mask if values is None else torch.where(mask, values, 0.0)
        mask = slab.rows(mask)
        return mask if values is None else torch.where(mask, values, 0.0)

    def global_sum(self, parts: list[Tensor]) -> Tensor:
        """One float64 scalar: the sum of ``parts`` (over devices)."""
        dev = parts[0].device
        if all(p.device == dev for p in parts):
            return torch.stack(parts).sum().double()
        return torch.stack([p.to(device=dev, dtype=torch.float64) for p in parts]).sum()


__all__ = ["Folded", "Statistics", "StepContext"]
