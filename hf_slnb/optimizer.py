"""The SLNB optimizer: gradient descent with every linear layer's inputs whitened in the metric."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import distributed, sharding
from .binding import ModelBinding, default_preset_for
from .checkpoint import Checkpointing
from .config import (
    GROUP_KEYS,
    OPTIONS,
    ORTH_DIRECTIONS,
    PRESETS,
    check_group,
    docstring_table,
    no_effect_message,
    resolve,
)
from .directions import direction_for
from .functional import SkipLog, cpu_path, nonfinite_flags
from .layout import StateLayout
from .slabs import Arena
from .step import StepContext
from .step_rules import metric_norm, step_rule

PAPER_URL = "https://arxiv.org/abs/2502.01131"
TRUST_REGIONS = next(o for o in OPTIONS if o.name == "trust_region").choices


#: The largest ``lr_scale * lr`` an orthogonalised step is taken at without a warning: at 0.3
#: (lr 3e-2 given to ``whitened``) four of 21 architectures learned little, at 1.0 most
#: diverged (BENCHMARKS.md, issue 13, round 17).
LARGE_STEP = 0.1


class SLNB(ModelBinding, StateLayout, Checkpointing, Optimizer):
    r"""Simple Linear Neuron Boosting (D. Munoz, arXiv 2502.01131), online variant.

    For every layer linear in its parameters (``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face
    ``Conv1D``, ``nn.Embedding``) the momentum gradient is preconditioned by the inverse second
    moment of the layer's input features; every other parameter uses the identity metric:

    .. math::
        \begin{aligned}
            &m_t \leftarrow \beta_g m_{t-1} + (1-\beta_g)\nabla_t, \qquad
              g_t = m_t / (1-\beta_g^t) \\
            &h_t = D(g_t)\ \text{(direction: } P g_t \text{, or PCG on }
              (J^\top J / N + \gamma I_W) h = g_t\text{)} \\
            &u_t = R(h_t, g_t)\ \text{(step rule: Adam's norm per row, or } h_t / n_t \text{ with }
              n_t = \sqrt{\max(\nu_{min}^2, \textstyle\sum_p \langle h_t, g_t\rangle)}\text{)} \\
            &\theta_t \leftarrow \theta_{t-1} - \eta\,(u_t + \lambda\,\theta_{t-1})
        \end{aligned}

    ``preset="paper"`` is ALGORITHM.md exactly (PCG, one global trust region, ``lr`` its
    radius); ``preset="graft"`` takes SLNB's diagonal direction and Adam's step size per output
    row (``lr`` an Adam-like step); ``preset="whitened"`` orthogonalises the layers of the
    repeated blocks in whitened coordinates, steps the rest as Adam, and maps AdamW's ``lr``
    onto its own (``lr_scale=10``). With ``preset=None`` (the default) a model with an
    ``nn.Linear``/``Conv1D`` inside a repeated block (a transformer) takes ``'whitened'``, any
    other ``'graft'`` (:func:`hf_slnb.binding.default_preset_for`). Every option left at
    ``None`` takes the preset's value; an option given explicitly that has no effect under the
    result is warned about.

    Args:
        params: Parameters or parameter groups, as for any ``torch.optim`` optimizer. Groups
            may override ``lr``, ``weight_decay``, ``momentum``, ``mean_decay``,
            ``sq_mean_decay``, ``shrinkage``, ``ridge`` and ``cg_iters``.
        model: The module whose layers are hooked to capture their inputs; it must own every
            parameter in ``params``.
        process_group: ``torch.distributed`` group over which statistics are summed in data
            parallel training (default: the world, when initialised).
        **options: The options of :data:`hf_slnb.config.OPTIONS` (``preset``, ``lr``,
            ``momentum``, ...), each documented there with its range; see also
            :func:`hf_slnb.config.docstring_table`.

    Fully sharded data parallel (FSDP2, ``fully_shard``) is supported: build the optimizer after
    sharding. ``nn.Linear`` is preconditioned shard by shard (its shards are output rows); other
    sharded layers, and every layer an orthogonalising direction takes, gather their gradient
    for the solve and keep their shard of the result.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *,
                 model: nn.Module, preset: str | None = None,
                 process_group: object | None = None,
                 **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(  # noqa: TRY004 - bad input is a ValueError here, whatever its type
                f"Invalid model={model!r}: must be the torch.nn.Module being trained.")
        config, idle = resolve(default_preset_for(model) if preset is None else preset,
                               **options)
        self.config = config
        super().__init__(params, {k: getattr(config, k) for k in GROUP_KEYS})
        if idle:
            warnings.warn(no_effect_message(config, idle), UserWarning, stacklevel=2)
        for i, group in enumerate(self.param_groups):
            self._warn_cg_iters(group, i)
            self._warn_large_step(group, i)
        self.model, self.process_group = model, process_group
        self.direction = direction_for(config)
        self.rule = step_rule(config.trust_region)(config)
        self.skipped_steps = 0
        #: Steps taken (a host count, saved with the options): the index of the next step,
        #: which decides the inputs it reads (``cov_every``).
        self.steps_taken = 0
        self._skips = SkipLog()
        self._last: dict[str, Any] = {}
        self._arenas: list[Arena] = []
        self._arenas_stale = True
        self._loaded_state = False
        self._names = self._parameter_names()
        self._shard_group = sharding.shard_group(self._all_params(), self._names)
        self._check_layers(set(self._current_param_ids()))
        self.neurons = self._find_neurons()
        self._param_ids = self._current_param_ids()
        self._build_banks()
        self._install_hooks(self.neurons)
        self._warn_nothing_orthogonalised()

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")  # the optimizer-level options, read-only
        if config is not None and hasattr(config, name) and name not in GROUP_KEYS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def preset(self) -> str:
        return self.config.preset

    def _warn_cg_iters(self, group: dict[str, Any], index: int) -> None:
        if group["cg_iters"] == 0 and not self.config.diagonal_only:
            warnings.warn(
                f"SLNB with cg_iters=0 and diagonal_only=False keeps every neuron's warm start "
                f"(zero): neurons in parameter group {index} move only by weight decay. Use "
                "diagonal_only=True for h = P g.", UserWarning, stacklevel=3)

    def _warn_large_step(self, group: dict[str, Any], index: int) -> None:
        """An orthogonalised step above :data:`LARGE_STEP` (``lr_scale * lr``: an lr above 1e-2
        under ``whitened``) learned little or diverged wherever it was tried: say so, with the
        lr to start from."""
        step = group["lr"] * self.config.lr_scale
        if self.config.trust_region != "orth" or step <= LARGE_STEP:
            return
        warnings.warn(
            f"SLNB (preset {self.config.preset!r}): lr={group['lr']:g} in parameter group "
            f"{index} steps at lr_scale * lr = {step:g}. Its best step was 0.01-0.03 (lr 1e-3 to "
            f"3e-3 given) on every task measured, and above {LARGE_STEP:g} runs learned little "
            "or diverged (BENCHMARKS.md, issue 13, round 17). If this is the lr you tuned for "
            "AdamW, start SLNB at lr=1e-3.", UserWarning, stacklevel=3)

    def _warn_nothing_orthogonalised(self) -> None:
        """An orthogonalising direction that takes none of the model's layers leaves every
        parameter with Adam's step: AdamW at SLNB's cost. Say so, with the cure."""
        if (self.config.direction not in ORTH_DIRECTIONS or not self.neurons
                or self.config.orth_rest == "diagonal"  # then every layer is preset 'graft''s
                or any(self.direction.takes(n) for n in self.neurons)):
            return
        kinds: dict[str, int] = {}
        for n in self.neurons:
            label = "head" if getattr(n, "is_head", False) else type(n.module).__name__
            kinds[label] = kinds.get(label, 0) + 1
        found = ", ".join(f"{count} {label}" for label, count in kinds.items())
        where = ("inside the repeated blocks, if there are any"
                 if self.config.orth_layers == "blocks" else "anywhere")
        warnings.warn(
            f"SLNB (preset {self.config.preset!r}, direction {self.config.direction!r}): no "
            f"layer of this model is orthogonalised (it takes nn.Linear and HF Conv1D layers "
            f"other than the output head; orth_layers={self.config.orth_layers!r}: {where}; "
            f"this model's layers: {found}). Every parameter takes Adam's step, so this is AdamW at extra "
            "cost. Use preset='graft' to precondition every layer (convolutions and embeddings "
            "included) with its input statistics, or orth_rest='diagonal' to give the layers "
            "it does not orthogonalise graft's step.", UserWarning, stacklevel=3)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, validated as the constructor's are; its layers are hooked.

        Raises:
            ValueError: For a bad hyperparameter, a parameter the model does not own, or a
                sparse embedding; the group is then not added.
        """
        index = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            check_group(self.param_groups[-1], f" in parameter group {index}")
            if hasattr(self, "neurons"):
                self._add_layers_of_group(self.param_groups[-1], index)
        except ValueError:
            self.param_groups.pop()
            raise
        if hasattr(self, "neurons"):
            self._warn_cg_iters(self.param_groups[-1], index)
            self._warn_large_step(self.param_groups[-1], index)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as ``torch.optim`` does, and drop the inputs captured with them."""
        super().zero_grad(set_to_none=set_to_none)
        self.clear_captures()

    def _world_size(self) -> int:
        return distributed.world_size(self.process_group)

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One SLNB step with the gradients and inputs accumulated since the last one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._begin_step()
        if not params:
            self.clear_captures()
            return loss
        counts = self._reduce_captures()  # first: it folds in the captures made under compile
        for arena in self._arenas:
            arena.acquire()
        live = self._screen(params)
        ctx = StepContext(self._arenas, self.banks, frozenset(map(id, params)),
                          live, self._group_of_param, counts, self._shard_group,
                          self.process_group, self.steps_taken)
        ctx.taken_as_is = self.rule.taken_as_is(ctx)
        self.rule.before(ctx)  # reads the raw gradients, which ctx.momentum overwrites
        ctx.momentum()
        self.direction.compute(ctx)
        self.rule.updates(ctx)
        if "slnb/step_norm" not in ctx.diagnostics:
            metric_norm(ctx, self.config.min_norm)
        self._apply(params, ctx)
        self._end_step(ctx)
        self.steps_taken += 1
        self._want_inputs()
        return loss

    def _begin_step(self) -> list[Tensor]:
        """Host-side bookkeeping: the parameters to step, arenas current, no sync."""
        self._follow_replaced_params()
        if self._hooks_taken:
            raise RuntimeError(
                f"SLNB: a newer SLNB optimizer built on the same model took over this one's hooks "
                f"(on {', '.join(repr(t) for t in self._hooks_taken[:5])}); this optimizer no "
                "longer sees the layers' inputs. Step the newer optimizer, or build one optimizer "
                "per model.")
        self._report_skips(self._skips.poll())
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("SLNB does not support sparse gradients "
                                           f"(parameter {self._names.get(id(p), '?')!r}).")
                    params.append(p)
        if any(n.bank is None or n.bank.dtype != n.dtype or n.bank.device != n.weight.device
               for n in self.neurons) or self._group_options_changed():
            self._build_banks()
        self._ensure_arenas(params)
        self._warn_uncaptured()
        return params

    def _group_options_changed(self) -> bool:
        seen = getattr(self, "_seen_options", None)
        now = [tuple(g[k] for k in GROUP_KEYS if k not in ("lr", "weight_decay"))
               for g in self.param_groups]
        self._seen_options = now
        return seen is not None and seen != now

    def _screen(self, params: list[Tensor]) -> Tensor:
        """The step's 0-d bool ``live`` (no inf/NaN in any gradient or captured input) and the
        gradients copied into the arenas' scratch; the skip is reported from a non-blocking
        copy of the flags (at once on the CPU)."""
        grads = [distributed.local(p.grad) for p in params]  # type: ignore[arg-type]
        caps = [b.sums for b in self.banks]
        checked = [t for t in grads + caps if t.numel() > 0]
        names, copies = self._screen_plan(params)
        for dst, idx in copies:
            torch._foreach_copy_(dst, [grads[i] for i in idx])
        if self._shard_group is None and all(cpu_path(a.device) for a in self._arenas) and (
                self._arenas) and all(cpu_path(t.device) for t in caps):
            # The CPU reads a flag freely: first the arenas' whole copies and the sums, a few
            # ops for every tensor at once; tensor by tensor only when one is not finite (or
            # when the copy of a parameter without a gradient left one so).
            whole = [a.grad for a in self._arenas] + [t for t in caps if t.numel() > 0]
            if bool(nonfinite_flags(whole).any()):
                flags = nonfinite_flags(checked)
            else:
                flags = torch.zeros(len(checked), dtype=torch.bool)
        else:
            flags = nonfinite_flags(checked)
        if self._shard_group is not None:  # every rank must skip, or none
            flags = flags.to(torch.float32)
            distributed.all_reduce_sum([flags], self._shard_group)
            flags = flags > 0
        self._skips.record(flags, names)
        live = flags.any().logical_not()
        if flags.device.type == "cpu":
            self._report_skips(self._skips.poll())
        return live

    def _screen_plan(self, params: list[Tensor]) -> tuple[list[str], list[Any]]:
        """The flags' names and each arena's scratch views for ``params``: host work that
        depends only on which parameters step, so it is made once per such set."""
        key = (tuple(map(id, params)), tuple(map(id, self._arenas)), tuple(map(id, self.banks)))
        plan = getattr(self, "_plan", None)
        if plan is None or plan[0] != key:
            names = [self._names.get(id(p), "?") for p in params if p.numel() > 0]
            names += [f"inputs of {b.neurons[0].name}" if len(b.neurons) == 1 else
                      f"inputs of one of {', '.join(n.name for n in b.neurons)}"
                      for b in self.banks]
            copies = []
            for a in self._arenas:
                views = a.views("grad")
                idx = [i for i, p in enumerate(params) if id(p) in a.index]
                if idx:
                    copies.append(([views[a.index[id(params[i])]] for i in idx], idx))
            plan = self._plan = (key, names, copies)
        return plan[1], plan[2]

    def _report_skips(self, skipped: list[list[str]]) -> None:
        self.skipped_steps = self._skips.skipped
        for bad in skipped:
            bad = list(dict.fromkeys(bad))
            warnings.warn(f"SLNB skipped a step: non-finite values in {', '.join(bad)}; "
                          "parameters and optimizer state are unchanged.", RuntimeWarning,
                          stacklevel=4)

    def _flush_skips(self) -> None:
        self._report_skips(self._skips.flush())

    def _apply(self, params: list[Tensor], ctx: StepContext) -> None:
        """``p <- p (1 - lr wd keep) - lr keep u`` with ``lr`` the group's times ``lr_scale``
        (and, for the parameters an orthogonalising direction leaves to another step, times
        ``rest_lr_scale``): one pair of foreach ops per group, arena and step size."""
        for arena in self._arenas:
            if not arena.all_live:
                arena.update.masked_fill_(arena.live_elements.logical_not(), 0.0)
        stepped = {id(p) for p in params}
        orth = self._stepped_apart()
        for group in self.param_groups:
            lr, wd = group["lr"] * self.config.lr_scale, group["weight_decay"]
            for arena in self._arenas:
                ps = [p for p in group["params"] if id(p) in stepped and id(p) in arena.index]
                if orth is None:
                    self._apply_at(arena, ps, lr, wd, ctx)
                    continue
                self._apply_at(arena, [p for p in ps if id(p) in orth], lr, wd, ctx)
                self._apply_at(arena, [p for p in ps if id(p) not in orth],
                               lr * self.config.rest_lr_scale, wd, ctx)

    def _stepped_apart(self) -> set[int] | None:
        """Ids of the weights the direction orthogonalises when the other parameters take
        another step size (``rest_lr_scale``; a host fact of the banks), else ``None``."""
        if self.config.rest_lr_scale == 1.0 or self.config.direction not in ORTH_DIRECTIONS:
            return None
        return {id(w) for b in self.banks if self.direction.applies(b) for w in b.weights}

    @staticmethod
    def _apply_at(arena: Any, ps: list[Tensor], lr: float, wd: float, ctx: StepContext) -> None:
        if not ps:
            return
        locals_ = [distributed.local(p) for p in ps]
        if wd != 0.0:
            keep = ctx.live.to(device=arena.device, dtype=arena.dtype)
            torch._foreach_mul_(locals_, keep.mul(-lr * wd).add_(1.0))
        views = arena.views("update")
        torch._foreach_add_(locals_, [views[arena.index[id(p)]] for p in ps], alpha=-lr)

    def _end_step(self, ctx: StepContext) -> None:
        """Publish new statistics, zero the captured sums, keep the diagnostics' raw material."""
        for bank in ctx.banks:
            for n in bank.neurons:
                # A layer whose input this step does not read (cov_every, orth_rest='adam')
                # publishes its statistics as they stand, as one that captured does.
                if (n.captured or not n.wanted) and not getattr(n, "has_stats", False):
                    n.has_stats = True
                    self._publish_neuron(n)
        sums = [b.sums for b in self.banks]
        sums += [b.grams for b in self.banks if b.grams is not None]
        if sums:
            torch._foreach_zero_(sums)
        for n in self.neurons:
            n.capture, n.compiled_seen = None, False
        self._last = {"ctx_residuals": ctx.residuals, "norm": ctx.diagnostics,
                      "pre": [(s, ctx.preconditioned.get(id(s))) for s in ctx.slabs],
                      "live": [(s, ctx.mask_rows(s, None)) for s in ctx.slabs]}
        for arena in self._arenas:  # the scratch costs no memory between steps
            arena.release()

    # -- diagnostics --------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Quantities of the last step worth logging (synchronises only when called).

        ``slnb/step_norm``: the metric norm ``n`` of the global trust region;
        ``slnb/cg_rel_residual``: the largest relative PCG residual over layers;
        ``slnb/preconditioned_fraction``: share of updated elements that were preconditioned;
        ``slnb/skipped_steps``: steps skipped for non-finite values so far.
        """
        self._flush_skips()
        out: dict[str, float] = {}
        last = self._last
        if last:
            out.update({k: float(v) for k, v in last["norm"].items()})
            res = last["ctx_residuals"]
            out["slnb/cg_rel_residual"] = float(torch.stack(res).max()) if res else 0.0
            total = pre = 0.0
            for (s, active), (_, live) in zip(last["pre"], last["live"]):
                live = live.expand(len(s.params)) if live.dim() == 0 else live
                n_live = float(live.sum()) * s.numel
                total += n_live
                if active is not None:
                    pre += float((active & live).sum()) * s.numel
            out["slnb/preconditioned_fraction"] = pre / max(total, 1.0)
        out["slnb/skipped_steps"] = float(self.skipped_steps)
        return out


SLNB.__doc__ = (SLNB.__doc__ or "") + "\n    Options (generated from :mod:`hf_slnb.config`):\n\n" + \
    docstring_table("    ") + "\n"

__all__ = ["PAPER_URL", "PRESETS", "SLNB", "TRUST_REGIONS"]
