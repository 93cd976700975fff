"""Step rules: how SLNB scales its directions, registered by ``trust_region`` name.

Each rule is one class that knows the state it keeps (per element, per tensor), whether ``lr``
is a trust-region radius and its default lr, and turns the directions ``h`` (with the
bias-corrected momenta ``g``) into updates ``u``: the step is ``p <- p (1 - lr wd) - lr u``.
Everything works on slabs (stacks of equal-shape parameters) with device masks; reductions over
sharded (FSDP2) slabs are summed over the shards in one collective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import register
from .functional import bias_correction, graft_ratio, per_layer, row_norms

if TYPE_CHECKING:
    from .step import StepContext


class StepRule:
    """Base class.

    Attributes:
        name: The ``trust_region`` value that selects it.
        element_keys: Per-element state it keeps (flat arena buffers).
        directed_keys: Those of ``element_keys`` it keeps none of for the weights that always
            take their direction (:meth:`hf_slnb.directions.Direction.directs_always`): their
            arenas' buffers end before those weights (:class:`hf_slnb.slabs.Arena`).
        tensor_keys: Per-tensor state it keeps (one number per parameter).
        lr_is_radius: ``lr`` is the metric length of the whole update (else an Adam-like step).
        per_row: Grafting per output row of each layer's weight.
    """

    name = ""
    element_keys: tuple[str, ...] = ()
    directed_keys: tuple[str, ...] = ()
    tensor_keys: tuple[str, ...] = ()
    lr_is_radius = False
    per_row = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def state_keys(self) -> tuple[str, ...]:
        return self.element_keys + self.tensor_keys

    def before(self, ctx: StepContext) -> None:
        """Arena-wide state updates from the (sanitised) gradients, before the directions."""

    def taken_as_is(self, ctx: StepContext) -> frozenset[int]:
        """Ids of the weight slabs whose update is their direction itself, unscaled: the
        direction may write it into the update buffer (:meth:`StepContext.direct_out`)."""
        return frozenset()

    def updates(self, ctx: StepContext) -> None:
        """Write ``u`` of every slab into ``ctx.arena.update``."""
        raise NotImplementedError


def _pieces(arena: Any, skip: frozenset[int], *flats: Tensor) -> list[tuple[Tensor, ...]]:
    """The arena's persistent flat buffers ``flats`` outside the slabs whose ids are in
    ``skip`` (which holds the arena's ``directed`` ones), side by side: the whole buffers when
    none of its slabs is skipped, else one tuple per run of the others
    (:meth:`hf_slnb.slabs.Arena.spans`)."""
    if not any(id(s) in skip for s in arena.slabs):
        return [flats]
    return list(zip(*(arena.spans(flat, skip) for flat in flats)))


def _prefix(flat: Tensor, n: int) -> Tensor:
    """The first ``n`` elements of a flat buffer (itself when it has ``n``)."""
    return flat if flat.numel() == n or flat.dim() == 0 else flat[:n]


def _inners(ctx: StepContext) -> dict[int, Tensor]:
    """``<h, g>`` per parameter, per slab ``(L,)``, summed over shards where sharded."""
    out = {id(s): torch.linalg.vecdot(ctx.h[id(s)].flatten(1), ctx.g[id(s)].flatten(1))
           for s in ctx.slabs}
    ctx.reduce_sharded({k: v for k, v in out.items() if ctx.sharded(k)})
    return out


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` of two equal-shape tensors, without the product's temporary where both
    are contiguous."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


def metric_norm(ctx: StepContext, min_norm: float) -> Tensor:
    """``n = sqrt(max(min_norm^2, sum_p <h, g>))`` over the parameters stepped now (also the
    ``slnb/step_norm`` diagnostic of every rule)."""
    parts = []
    if ctx.shard_group is None and all(a.live_params.dim() == 0 for a in ctx.arenas):
        # Every parameter stepped (the usual case): the banks' <h, g> (h = g for a layer that
        # saw no input) plus one dot over the rest of each arena's momenta (the identity
        # metric: <g, g>).
        for arena in ctx.arenas:
            parts += [_dot(ctx.h[id(s)], ctx.g[id(s)]) for s in arena.slabs if s.in_bank]
            tail = arena.identity_tail()
            if tail is not None:
                parts.append(torch.dot(tail, tail))
    else:
        inners = _inners(ctx)
        for arena in ctx.arenas:
            q = torch.cat([inners[id(s)] for s in arena.slabs])
            parts.append(torch.where(arena.live_params, q, 0.0).sum())
    total = ctx.global_sum(parts)
    n = torch.sqrt(torch.clamp(total, min=min_norm ** 2))
    ctx.diagnostics["slnb/step_norm"] = n
    return n


def _bank_slabs(ctx: StepContext) -> list[Any]:
    return [s for s in ctx.slabs if id(s) in ctx.preconditioned]


class GlobalRadius(StepRule):
    """The paper's: one unit step under the metric for the whole model (``lr`` its radius)."""

    name = "global"
    lr_is_radius = True

    def updates(self, ctx: StepContext) -> None:
        inv = torch.reciprocal(metric_norm(ctx, self.config.min_norm))
        for arena in ctx.arenas:  # the identity metric everywhere, then the banks' directions
            torch.mul(arena.grad, inv.to(arena.device, arena.dtype), out=arena.update)
        for s in _bank_slabs(ctx):
            torch.mul(ctx.h[id(s)], inv.to(s.arena.device, s.arena.dtype),
                      out=s.stack(s.arena.update))


class TensorRMS(StepRule):
    """Each tensor divided by ``sqrt(EMA(<h, g> / numel)) + eps`` (Adam-mini style)."""

    name = "tensor"
    tensor_keys = ("metric_sq",)

    def updates(self, ctx: StepContext) -> None:
        inners = _inners(ctx)
        d = self.config.norm_decay
        for s in ctx.slabs:
            arena = s.arena
            ms = s.rows(arena.per_tensor["metric_sq"], persistent=True)
            q = torch.clamp(inners[id(s)] / float(s.numel_global), min=0.0).to(ms.dtype)
            torch.where(ctx.mask_rows(s, None), torch.lerp(ms, q, 1.0 - d), ms, out=ms)
            bc = bias_correction(d, s.rows(arena.steps, persistent=True)).to(ms.dtype)
            scale = torch.reciprocal(torch.sqrt(ms / bc).add_(self.config.eps))
            torch.mul(ctx.h[id(s)], per_layer(scale, ctx.h[id(s)]), out=s.stack(arena.update))


class AdamGraft(StepRule):
    """Adam grafting: each tensor's (or each output row's) step has Adam's norm, SLNB's direction.

    Parameters with the identity metric take Adam's step itself. ``norm_decay`` is Adam's
    ``beta2``, the momentum its ``beta1``.
    """

    name = "graft"
    element_keys = ("exp_avg_sq",)

    def before(self, ctx: StepContext) -> None:
        self.second_moment(ctx)

    def second_moment(self, ctx: StepContext) -> None:
        """Adam's ``v`` from the raw gradients, for the parameters that keep it: the arena's
        first ``kept`` elements (all of them but the weights of :attr:`directed_keys`)."""
        for arena in ctx.arenas:  # the update buffer is free scratch until the step rule
            v = arena.buffers["exp_avg_sq"]
            n = v.numel()
            sq, grad = _prefix(arena.update, n), _prefix(arena.grad, n)
            torch.mul(grad, grad, out=sq)
            if not arena.all_live:  # skipped or gradient-free: v stays
                torch.where(_prefix(arena.live_elements, n), sq, v, out=sq)
            v.lerp_(sq, 1.0 - self.config.norm_decay)

    def updates(self, ctx: StepContext) -> None:
        self.adam(ctx)
        self.graft(ctx)

    def adam(self, ctx: StepContext, skip: frozenset[int] = frozenset()) -> None:
        """Adam's direction into the update buffer, everywhere but the slabs whose ids are in
        ``skip`` (a step rule that overwrites them: their rows are left as they were)."""
        d, eps = self.config.norm_decay, self.config.eps
        for arena in ctx.arenas:
            u, v = arena.update, arena.buffers["exp_avg_sq"]
            left = skip | arena.directed  # the directed weights have no v
            pieces = _pieces(arena, left, u, v, arena.grad)
            if arena.uniform:
                bc = bias_correction(d, arena.step0).to(arena.dtype)
                for uu, vv, _ in pieces:
                    torch.div(vv, bc, out=uu)
            else:
                bc = bias_correction(d, arena.steps)
                for s, rows in zip(arena.slabs, ctx.split(arena, bc)):
                    if id(s) not in left:
                        torch.div(s.stack(v), per_layer(rows, s.stack(v)), out=s.stack(u))
            for uu, _, gg in pieces:
                uu.sqrt_().add_(eps)
                torch.div(gg, uu, out=uu)

    def graft(self, ctx: StepContext, slabs: list[Any] | None = None,
              per_row: bool | None = None) -> None:
        """The banks (or ``slabs``): SLNB's direction at the length of Adam's (in the update
        buffer), per output row or per tensor (``per_row``, by default the rule's)."""
        pending = []
        per_row = self.per_row if per_row is None else per_row
        for s in _bank_slabs(ctx) if slabs is None else slabs:
            dims = ctx.row_dims(s) if per_row else tuple(range(len(s.shape)))
            adam, h = s.stack(s.arena.update), ctx.h[id(s)]
            pending.append((s, row_norms(adam, dims), row_norms(h, dims), dims))
        sharded = {i: torch.stack([a2, h2]).square_() for i, (s, a2, h2, dims) in
                   enumerate(pending) if ctx.sharded(id(s)) and 0 in dims}
        ctx.reduce_sharded(sharded)  # squared norms sum over the shards
        for i, (s, a2, h2, _) in enumerate(pending):
            if i in sharded:
                a2, h2 = sharded[i].sqrt_().unbind()
            h, out = ctx.h[id(s)], s.stack(s.arena.update)
            if ctx.all_captured(s):
                torch.mul(h, graft_ratio(a2, h2), out=out)
            else:
                u = h * graft_ratio(a2, h2)
                torch.where(per_layer(ctx.preconditioned[id(s)], u), u, out, out=out)


class OrthAdam(AdamGraft):
    """For an orthogonalised direction (``direction='whitened_orth'``): its layers take the
    direction itself (RMS 0.2 per unit lr, Moonlight's match to AdamW), everything else takes
    Adam's step, all at one ``lr``, AdamW's (Muon's authors pair an orthogonalised step on the
    hidden matrices with Adam on embeddings, head, biases and norms). The slabs the direction
    marks in :attr:`StepContext.grafted` (``orth_rest='diagonal'``) take their direction at
    Adam's length per output row instead."""

    name = "orth"
    # No v for the weights that take the direction on every step (whitened_orth's): nothing
    # would read it.
    directed_keys = ("exp_avg_sq",)

    def taken_as_is(self, ctx: StepContext) -> frozenset[int]:
        # The weights laid out without v (whitened_orth's) take the direction on every step.
        return frozenset().union(*(arena.directed for arena in ctx.arenas))

    def updates(self, ctx: StepContext) -> None:
        banks = _bank_slabs(ctx)
        grafted = [s for s in banks if id(s) in ctx.grafted]
        copied = [s for s in banks if id(s) not in ctx.grafted]
        # Adam's direction wherever a layer may take it: not on the slabs of layers that all
        # take the orthogonalised direction (all captured), which is copied over them below.
        self.adam(ctx, frozenset(id(s) for s in copied if ctx.all_captured(s)))
        if grafted:  # orth_rest='diagonal': SLNB's direction at Adam's length per row
            self.graft(ctx, grafted, per_row=True)
        for s in copied:
            out = s.stack(s.arena.update)
            u = ctx.h[id(s)]
            if u is out:  # written there by the direction (StepContext.direct_out)
                continue
            if ctx.all_captured(s):
                out.copy_(u)
            else:
                torch.where(per_layer(ctx.preconditioned[id(s)], u), u, out, out=out)


class AdamGraftRow(AdamGraft):
    """Adam grafting per output row of each layer's weight (per tensor elsewhere)."""

    name = "graft_row"
    per_row = True


#: The rules by their user-facing ``trust_region`` name.
STEP_RULES: dict[str, type[StepRule]] = {}


def register_step_rule(cls: type[StepRule]) -> type[StepRule]:
    """Register a rule class under its ``name`` (``ValueError`` if taken)."""
    return register(STEP_RULES, cls, "step rule")


for _cls in (GlobalRadius, TensorRMS, AdamGraft, AdamGraftRow, OrthAdam):
    register_step_rule(_cls)


def step_rule(name: str) -> type[StepRule]:
    """The registered rule called ``name``, or ``ValueError`` listing the allowed names."""
    if name not in STEP_RULES:
        raise ValueError(f"Invalid trust_region={name!r}: must be one of {tuple(STEP_RULES)}.")
    return STEP_RULES[name]


__all__ = ["STEP_RULES", "AdamGraft", "AdamGraftRow", "GlobalRadius", "StepRule", "TensorRMS",
           "register_step_rule", "step_rule"]
