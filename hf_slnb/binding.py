"""How an SLNB optimizer binds to its model: layers found, hooked, followed when replaced.

:class:`ModelBinding` is a mixin of :class:`hf_slnb.SLNB`: it finds the layers SLNB
preconditions (one helper per layer, the tied weight's owner chosen), groups them into banks,
installs the capture hooks (:mod:`hf_slnb.hooks`), follows parameters replaced after
construction (Accelerate's FSDP2 sharding) and drops captures when gradients are reset.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import distributed, hooks, sharding
from .config import DEFAULT_PRESET, FALLBACK_PRESET, compile_patterns
from .layers import Bank, Neuron, is_hf_conv1d, neuron_for


def block_members(model: nn.Module) -> set[str]:
    """Qualified names of the modules inside a repeated block: a member of an ``nn.ModuleList``
    or ``nn.Sequential`` that has modules of its own (a transformer layer), not a bare layer (an
    MLP's ``Linear``). A pooler or classifier beside the blocks is not inside one."""
    out: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        for child_name, child in module.named_children():
            if next(child.children(), None) is None:
                continue
            prefix = f"{name}.{child_name}" if name else child_name
            out.update(f"{prefix}.{sub}" if sub else prefix for sub, _ in child.named_modules())
    return out


def default_preset_for(model: nn.Module) -> str:
    """The preset SLNB takes when none is given: :data:`~hf_slnb.config.DEFAULT_PRESET`
    (``'whitened'``) for a model with a trained ``nn.Linear`` or HF ``Conv1D`` inside a repeated
    block (:func:`block_members`: a transformer layer), the layers that preset orthogonalises;
    :data:`~hf_slnb.config.FALLBACK_PRESET` (``'graft'``) for any other, where ``'whitened'``
    would orthogonalise nothing, or a classifier alone, and step the rest as AdamW at its
    ``lr_scale`` times the lr."""
    blocks = block_members(model)
    for name, module in model.named_modules():
        if name in blocks and (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
            weight = getattr(module, "weight", None)
            if isinstance(weight, Tensor) and weight.requires_grad:
                return DEFAULT_PRESET
    return FALLBACK_PRESET


class ModelBinding:
    """The model side of :class:`hf_slnb.SLNB` (see the module docstring)."""

    model: nn.Module
    neurons: list[Neuron]
    param_groups: list[dict[str, Any]]
    config: Any

    # -- discovery -------------------------------------------------------------------------------
    def _parameter_names(self) -> dict[int, str]:
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"Invalid params: a parameter of shape {tuple(p.shape)} in group {i} is "
                        f"not owned by model={type(self.model).__name__}; SLNB can only "
                        "precondition parameters of the model it hooks.")
        return names

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _find_neurons(self) -> list[Neuron]:
        patterns = compile_patterns(self.config.skip_modules)
        mine = {id(p) for p in self._all_params()}
        by_weight: dict[int, list[Neuron]] = {}
        for name, module in self.model.named_modules():
            if any(p.search(name) for p in patterns) or parametrize.is_parametrized(module,
                                                                                     "weight"):
                continue  # reading a parametrized weight computes it: see _check_layers
            neuron = neuron_for(name, module, self.config.precondition_embeddings,
                                self.config.metric_backend)
            if neuron is None or id(neuron.weight) not in mine:
                continue
            if neuron.bias is not None and id(neuron.bias) not in mine:
                neuron.bias = None  # a frozen bias: the neuron is bias-free
            by_weight.setdefault(id(neuron.weight), []).append(neuron)
        chosen = []
        for owners in by_weight.values():
            # A tied weight (GPT-2's wte / lm_head) takes the metric of its non-embedding owner.
            owners.sort(key=lambda n: n.kind == "embedding")
            chosen.append(owners[0])
        return chosen

    def _check_layers(self, ids: set[int], stacklevel: int = 3) -> None:
        """Refuse sparse embeddings; warn once about layers whose weight is computed
        (``stacklevel``: the warning names the user's line, the constructor's caller by
        default)."""
        patterns = compile_patterns(self.config.skip_modules)
        computed = []
        kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
        if self.config.precondition_embeddings:
            kinds += (nn.Embedding,)
        for name, module in self.model.named_modules():
            if parametrize.is_parametrized(module, "weight"):
                weight = None  # computed on access (spectral_norm even updates its buffers)
            else:
                weight = getattr(module, "weight", None)
                if (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
                        and id(weight) in ids):
                    raise ValueError(
                        f"Invalid model: module {name!r} is {type(module).__name__}"
                        "(sparse=True), whose sparse gradients SLNB does not support; build it "
                        "with sparse=False or leave its weight out of params.")
                if not isinstance(weight, Tensor) or isinstance(weight, nn.Parameter):
                    continue
            if any(p.search(name) for p in patterns) or not (
                    isinstance(module, kinds) or is_hf_conv1d(module)):
                continue
            if {id(q) for q in module.parameters()} & ids:
                computed.append(name)
        if computed:
            warnings.warn(
                f"SLNB gives the identity metric to {', '.join(repr(n) for n in computed)}: "
                "their weight is computed from other parameters (torch.nn.utils.parametrize, "
                "weight_norm), so the metric of their inputs does not apply to the parameters "
                "trained. Remove the parametrization (torch.nn.utils.parametrize."
                "remove_parametrizations) to precondition them.", UserWarning,
                stacklevel=stacklevel)

    # -- banks -------------------------------------------------------------------------------------
    def _group_options(self, p: Tensor) -> tuple[Any, ...]:
        group = self._group_of_param.get(id(p))
        if group is None:
            return ()
        return tuple(group[k] for k in ("momentum", "mean_decay", "sq_mean_decay", "shrinkage",
                                        "ridge", "cg_iters"))

    def _build_banks(self) -> None:
        """Group the layers into banks (same type, shape, dtype, device, group options); a
        sharded layer is a bank of its own. Captured sums are carried into the new banks."""
        self._group_of_param = {id(p): g for g in self.param_groups for p in g["params"]}
        old = {id(n): (n.capture, n.bank, n.row) for n in self.neurons}
        heads = {id(n) for n, _ in hooks.head_sources(self.model, self.neurons)}
        blocks = block_members(self.model)
        any_block = any(n.name in blocks for n in self.neurons)
        for n in self.neurons:
            n.is_head = id(n) in heads
            n.in_block = n.name in blocks or not any_block
        by_key: dict[tuple[Any, ...], list[Neuron]] = {}
        for n in self.neurons:
            key = (n.bank_key() + self.direction.bank_key(n)
                   + self._group_options(n.weight))
            if sharding.distributed.is_dtensor(n.weight):
                key += (id(n),)
            by_key.setdefault(key, []).append(n)
        self.banks = []
        for members in by_key.values():
            group = self._group_of_param[id(members[0].weight)]
            bank = Bank(members, members[0].dtype, members[0].weight.device,
                        (group["mean_decay"], group["sq_mean_decay"]))
            bank.layout = sharding.layout_for(members[0], self.config.diagonal_only,
                                              self._shard_group)
            self.banks.append(bank)
        for n in self.neurons:
            n.needs_moments = self.direction.needs_moments(n)
            if n.needs_moments and self.config.direction == "whitened_orth":
                n.backend = "explicit"  # the whitening needs every step's sum x x^T
                n.gram_rows = self.config.cov_rows
        for bank in self.banks:  # the whitening reads each step's x xᵀ as a stack
            if self.config.direction == "whitened_orth" and bank.neurons[0].needs_moments:
                bank.keep_grams(self.direction.blocks(bank.neurons[0])[0])
        for n in self.neurons:
            cap, bank, row = old[id(n)]
            ref = weakref.ref(self)
            n.rebank = lambda ref=ref: ref()._build_banks()  # type: ignore[union-attr]
            if bank is not None and bank is not n.bank:  # carry statistics and captures over
                for key in ("stats", "sums"):
                    getattr(n.bank, key)[n.row].copy_(getattr(bank, key)[row])
                n.bank.stat_step[n.row].copy_(bank.stat_step[row])  # type: ignore[union-attr]
                if bank.grams is not None and n.bank_gram is not None:  # eager and compiled
                    n.bank_gram.copy_(bank.grams[row].view_as(n.bank_gram))  # captures' x xᵀ
            if cap is not None:
                cap.sum_x, cap.sum_x2 = n.rows
                if cap.gram is not None and n.bank_gram is not None and cap.gram is not n.bank_gram:
                    if bank is None or bank.grams is None:  # the capture held its own
                        n.bank_gram.copy_(cap.gram)
                    cap.gram = n.bank_gram
        self._want_inputs()
        self._arenas_stale = True

    # -- parameters replaced after construction ---------------------------------------------------
    def _current_param_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for p in self._all_params())

    def _follow_replaced_params(self) -> None:
        """Rebind the layers to parameters replaced after construction (Accelerate shards an
        FSDP2 model after the Trainer built the optimizer and swaps the new ones in)."""
        ids = self._current_param_ids()
        if ids == self._param_ids:
            return
        self._param_ids = ids
        self._names = self._parameter_names()
        self._shard_group = sharding.shard_group(self._all_params(), self._names)
        mine = set(ids)
        for n in self.neurons:
            weight = getattr(n.module, "weight", None)
            if isinstance(weight, Tensor):
                n.weight = weight
            bias = getattr(n.module, "bias", None)
            n.bias = bias if isinstance(bias, Tensor) and id(bias) in mine else None
        self._build_banks()

    # -- hooks -------------------------------------------------------------------------------------
    def _install_hooks(self, neurons: list[Neuron], stacklevel: int = 3) -> None:
        """Hook ``neurons``' modules (weakly, picklable, one owner per module; see ``hooks``;
        ``stacklevel`` as :meth:`_check_layers`)."""
        if not hasattr(self, "_hooks"):
            self._handles: list[Any] = []
            self._hooks: list[hooks.CaptureHook] = []
            self._hooks_taken: list[str] = []
            self._uncaptured_warned: set[str] = set()
            self._finalizer = weakref.finalize(self, hooks.remove, self._handles, self._hooks)
        taken = hooks.install(self, self.model, neurons, self._handles, self._hooks)  # type: ignore[arg-type]
        if taken:
            shown = ", ".join(repr(t) for t in taken[:5]) + (" ..." if len(taken) > 5 else "")
            warnings.warn(
                f"SLNB: {len(taken)} module(s) of this model were hooked by an earlier SLNB "
                f"optimizer that is still alive ({shown}); their hooks now belong to the new "
                "optimizer, and the earlier one refuses to step. Call remove_hooks() on an "
                "optimizer you no longer use.", UserWarning, stacklevel=stacklevel)

    def remove_hooks(self) -> None:
        """Detach SLNB from the model (the optimizer then falls back to the identity metric)."""
        hooks.remove(self._handles, self._hooks)
        self.clear_captures()

    def _want_inputs(self) -> None:
        """Tell each layer's hook whether the next step reads its input (host flags)."""
        for n in self.neurons:
            n.wanted = self.direction.wants_input(n, self.steps_taken)

    def clear_captures(self) -> None:
        """Drop the inputs captured since the last step."""
        for n in self.neurons:
            n.drop_capture()

    def _warn_uncaptured(self) -> None:
        """Warn once per layer whose weight has a gradient but whose input was never seen."""
        if not self._hooks:
            return
        for n in self.neurons:
            if not n.captured and n.wanted and n.weight.grad is not None and (
                    n.name not in self._uncaptured_warned):
                self._uncaptured_warned.add(n.name)
                warnings.warn(
                    f"SLNB: layer {n.name!r} got a gradient but SLNB never saw its input (the "
                    "layer was used functionally, e.g. through F.linear(x, layer.weight), or ran "
                    f"in eval mode or under torch.no_grad()); {self.direction.without_input(n)}. "
                    "Call the module itself, or add it to skip_modules to silence this."
                    + _compiled_hint(), UserWarning, stacklevel=5)

    def _reduce_captures(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Each bank's input and output positions on the device (one copy per bank), with its
        sums, summed over the data-parallel ranks when there are several (one collective)."""
        world = distributed.world_size(self.process_group)
        counts: dict[int, tuple[Tensor, Tensor]] = {}
        reduce: list[Tensor] = []
        by_arena: dict[tuple[Any, ...], list[Any]] = {}
        for bank in self.banks:
            by_arena.setdefault((bank.dtype, bank.device), []).append(bank)
        for (dtype, device), banks in by_arena.items():
            # Host numbers into a fresh (pinned) host tensor, filled through numpy (no tensor
            # built from Python data), copied without waiting: one copy per device and dtype.
            sizes = [len(b.neurons) for b in banks]
            host = torch.empty(2, sum(sizes), 1, 1, dtype=dtype, pin_memory=device.type == "cuda")
            per_bank = [b.counts() for b in banks]
            host.numpy()[:, :, 0, 0] = [[v for c in per_bank for v in c[k]] for k in (0, 1)]
            dev = host.to(device, non_blocking=True)
            reduce.append(dev)
            for bank, c, n in zip(banks, *(torch.split(t, sizes) for t in dev.unbind())):
                if bank.compiled:  # captures made inside torch.compile: in place, so that a
                    # data-parallel reduction of ``dev`` sums them too
                    c.add_(bank.compiled_counts[:, 0].reshape(c.shape))
                    n.add_(bank.compiled_counts[:, 1].reshape(n.shape))
                    bank.compiled_counts.zero_()
                    bank.compiled = False
                counts[id(bank)] = (c, n)
        reduce_fn = None
        if world > 1:
            tensors = [b.sums for b in self.banks]
            tensors += reduce
            tensors += [t for n in self.neurons for t in n.reduce_tensors()]
            distributed.all_reduce_sum(tensors, self.process_group)

            def reduce_fn(ts: list[Tensor]) -> None:
                distributed.all_reduce_sum(ts, self.process_group)
        for n in self.neurons:
            n.reduce_fn = reduce_fn
        return counts

    def _add_layers_of_group(self, group: dict[str, Any], index: int) -> None:
        """``add_param_group`` after construction: check, then hook the group's layers."""
        self._names = self._parameter_names()
        self._shard_group = sharding.shard_group(self._all_params(), self._names)
        self._check_layers({id(p) for p in group["params"]}, stacklevel=4)
        known = {id(n.weight) for n in self.neurons}
        new = [n for n in self._find_neurons() if id(n.weight) not in known]
        mine = set(self._current_param_ids())
        for n in self.neurons:  # a hooked layer whose bias joins with this group
            bias = getattr(n.module, "bias", None)
            if n.bias is None and isinstance(bias, Tensor) and id(bias) in mine:
                n.bias = bias
        self.neurons.extend(new)
        self._param_ids = self._current_param_ids()
        self._build_banks()
        self._install_hooks(new, stacklevel=4)


def _compiled_hint() -> str:
    """What to add to the uncaptured-layer warning when this process has compiled graphs."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return ""
    try:
        compiled = dynamo.utils.counters["stats"]["unique_graphs"] > 0
        skips = bool(dynamo.config.skip_nnmodule_hook_guards)
    except AttributeError:
        return ""
    if not (compiled and skips):
        return ""
    return (" If the model runs under torch.compile: Dynamo does not guard on module hooks "
            "(torch._dynamo.config.skip_nnmodule_hook_guards=True), so a graph compiled earlier "
            "in this process for another model of the same class runs here without SLNB's "
            "hooks. Call torch._dynamo.reset() before compiling this model, or set "
            "torch._dynamo.config.skip_nnmodule_hook_guards = False.")


__all__ = ["ModelBinding"]
