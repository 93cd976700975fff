"""Where the optimizer state lives: arenas of slabs for parameters, banks for layers.

:class:`StateLayout` is a mixin of :class:`hf_slnb.SLNB`. It lays the stepped parameters out in
arenas (:mod:`hf_slnb.slabs`; a bank's weights and biases as slabs aligned with the bank), keeps
``optimizer.state`` pointing at views of the buffers (so the standard ``state_dict`` has
everything), and copies a loaded or replaced state back into the buffers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import distributed
from .layers import stat_dtype
from .slabs import Arena, _like


class StateLayout:
    """The state side of :class:`hf_slnb.SLNB` (see the module docstring)."""

    banks: list[Any]
    neurons: list[Any]
    state: Any
    config: Any

    def _ensure_arenas(self, params: list[Tensor]) -> None:
        """(Re)build the arenas when a parameter is new, or changed dtype or device."""
        known: set[int] = getattr(self, "_laid_out", set())
        stale = self._arenas_stale or any(id(p) not in known for p in params) or any(
            stat_dtype(p.dtype) != a.dtype or p.device != a.device
            for a in self._arenas for p in a.params)
        if stale:
            members = [p for p in self._all_params()
                       if id(p) in known or p.grad is not None or p.requires_grad]
            self._arenas = self._layout(members)
            known = self._laid_out = {i for a in self._arenas for i in a.index}
            self._arenas_stale = False
            self._loaded_state = True  # copy any existing state (views of old buffers) in
        if self._loaded_state:
            for arena in self._arenas:
                arena.adopt(self._state_of)
                arena.publish(self._state_of)
            self._adopt_bank_state()
            if self._shard_group is not None:  # a DCP template needs every key at once
                for n in self.neurons:
                    if id(n.weight) in known:
                        self._warm_starts(n.bank)
                        n.has_stats = True
                        self._publish_neuron(n)
            self._loaded_state = False

    def _state_of(self, p: Tensor) -> dict[str, Any]:
        return self.state[p]

    def _layout(self, members: list[Tensor]) -> list[Arena]:
        """Arenas of ``members``: banks' weights and biases first (aligned with the banks),
        then the other parameters grouped by shape and group options, then the weights the
        direction always takes where the rule keeps less state for them (``directed_keys``)."""
        groups_of = self._group_of_param
        mine = {id(p) for p in members}
        by_arena: dict[tuple[Any, ...], dict[tuple[Any, ...], list[Tensor]]] = {}
        placed: set[int] = set()

        def add(key: tuple[Any, ...], p: Tensor) -> None:
            arena_key = (stat_dtype(p.dtype), p.device)
            by_arena.setdefault(arena_key, {}).setdefault(key, []).append(p)
            placed.add(id(p))

        # The weights that always take their direction keep none of the rule's directed_keys
        # (OrthAdam: no Adam moment): laid out last, so those buffers end before them.
        sparse = self.rule.directed_keys
        directed = []
        for bank in self.banks:  # a bias without gradients: the layers are bias-free
            if all(id(w) in mine for w in bank.weights):
                if sparse and self.direction.directs_always(bank):
                    directed.append(bank)
                    placed.update(map(id, bank.weights))
                else:
                    for w in bank.weights:
                        add(("bank", id(bank), "w"), w)
                if bank.has_bias and all(id(b) in mine and b.requires_grad for b in bank.biases):
                    for b in bank.biases:
                        add(("bank", id(bank), "b"), b)
        for p in members:
            if id(p) not in placed:
                shape = tuple(distributed.local(p).shape)
                add(("plain", shape, groups_of[id(p)]["momentum"], distributed.is_dtensor(p)
                     and id(p)), p)
        tails: dict[tuple[Any, ...], int] = {}
        for bank in directed:
            for w in bank.weights:
                add(("bank", id(bank), "w"), w)
            key = (stat_dtype(bank.weights[0].dtype), bank.weights[0].device)
            tails[key] = tails.get(key, 0) + 1
        element_keys = ("momentum_buffer",) + self.rule.element_keys
        arenas = []
        for (dtype, device), slabs in by_arena.items():
            betas = [groups_of[id(p)]["momentum"] for ps in slabs.values() for p in ps]
            arenas.append(Arena(list(slabs.values()), list(slabs), betas, dtype, device,
                                element_keys, self.rule.tensor_keys, sparse,
                                tails.get((dtype, device), 0)))
        return arenas

    def _publish_neuron(self, n: Any) -> None:
        bank, i = n.bank, n.row
        state = self.state[n.weight]
        state["mu"], state["nu"], state["stat_step"] = bank.state_rows[i]
        for key, stack in self.direction.bank_state(bank).items():
            state[key] = stack[i]
        if "solution" in self.direction.state_keys and bank.sol is not None:
            state["solution"] = _like(bank.sol[0][i], n.weight)
            if n.bias is not None and len(bank.sol) == 2:
                self.state[n.bias]["solution"] = _like(bank.sol[1][i], n.bias)

    def _warm_starts(self, bank: Any) -> None:
        """Make the bank's (zero) PCG warm starts if the direction keeps them."""
        if "solution" in self.direction.state_keys:
            n = bank.neurons[0]
            owners = [n.weight] + ([n.bias] if n.bias is not None else [])
            bank.solutions(tuple(torch.zeros((len(bank.neurons),) + distributed.local(p).shape,
                                             dtype=bank.dtype, device=bank.device)
                                 for p in owners))

    def _publish_state(self) -> None:
        for n in self.neurons:
            if getattr(n, "has_stats", False):
                self._publish_neuron(n)

    def _adopt_bank_state(self) -> None:
        """Copy loaded statistics (and warm starts) into the banks."""
        for n in self.neurons:
            state = self.state.get(n.weight, {})
            if "mu" not in state:
                continue
            bank, i = n.bank, n.row
            for key, dst in zip(("mu", "nu", "stat_step"), bank.state_rows[i]):
                if state[key].data_ptr() != dst.data_ptr():
                    dst.copy_(state[key].reshape(dst.shape))
            for key, stack in self.direction.bank_state(bank).items():
                value = state.get(key)
                if value is None:
                    continue
                if value.data_ptr() != stack[i].data_ptr():  # else loaded in place (DCP)
                    stack[i].copy_(value)
                bank.whiten_steps = int(bank.stat_step[i].item())  # loading: a sync is fine
            sol = state.get("solution")
            if sol is not None:
                owners = [n.weight] + ([n.bias] if n.bias is not None else [])
                self._warm_starts(bank)
                for p, s in zip(owners, bank.sol):
                    value = self.state[p].get("solution")
                    if value is not None:
                        s[i].copy_(distributed.local(value))
            n.has_stats = True
            self._publish_neuron(n)

    def _loaded(self) -> None:
        self._loaded_state = True
        self._arenas_stale = True


__all__ = ["StateLayout"]
