"""Update directions: how a layer's momentum gradient ``g`` becomes its direction ``h``.

A direction is one class registered in :data:`DIRECTIONS`: it owns the state keys it keeps and
computes ``h`` for every bank of layers (the stacked gradients of same-shape layers) from the
bank's feature statistics. Parameters outside layers keep ``h = g`` (the identity metric), and so
does a layer that saw no input this step. Adding a direction is one class and one registration
line (see ``tests/test_composability.py``, which adds a toy one).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import distributed
from . import whitened as W
from .config import register
from .functional import Stack, conjugate_gradient, cpu_path, per_layer
from .layers import symmetrize_

#: RMS of an orthogonalised layer update per unit lr (Moonlight, arXiv 2502.16982: AdamW's
#: typical update RMS), so that one lr, AdamW's, serves these layers and Adam's alike.
RMS = 0.2

if TYPE_CHECKING:
    from .layers import Bank
    from .step import StepContext


class Direction:
    """Base: ``h = g`` everywhere (subclasses precondition the banks).

    Attributes:
        name: Registry name.
        state_keys: Per-layer state a bank keeps for this direction (besides ``mu``/``nu``).
    """

    name = "identity"
    state_keys: tuple[str, ...] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    def compute(self, ctx: StepContext) -> None:
        """Set ``ctx.h`` for the banks' slabs (``ctx.h`` starts as ``g`` for every slab)."""
        for bank in ctx.banks:
            g = ctx.bank_grads(bank)
            stats = ctx.statistics(bank)
            h = bank.layout.solve(bank, g, lambda gs, b=bank, s=stats: self.solve(ctx, b, gs, s))
            self.commit(bank, h, stats.active & ctx.live)
            ctx.set_bank_direction(bank, h, stats.active)

    def takes(self, neuron: Any) -> bool:
        """Whether this direction orthogonalises ``neuron`` (none here; see
        :class:`WhitenedOrth`)."""
        return False

    def bank_key(self, neuron: Any) -> tuple[Any, ...]:
        """What, beside type, shape and options, keeps layers in separate banks (layers that
        this direction treats differently)."""
        return ()

    def bank_state(self, bank: Bank) -> dict[str, Tensor]:
        """Per-layer state stacks ``(L, ...)`` this direction keeps in a bank (published as
        views in ``optimizer.state[weight]``, copied back after a load)."""
        return {}

    def needs_moments(self, neuron: Any) -> bool:
        """Whether a layer's capture keeps more than the diagonal statistics."""
        return not self.config.diagonal_only

    def wants_input(self, neuron: Any, index: int) -> bool:
        """Whether the step of index ``index`` (the optimizer's count of steps taken) reads
        ``neuron``'s captured input: its forwards and backwards capture nothing otherwise."""
        return True

    def without_input(self, neuron: Any) -> str:
        """What a layer whose input was never seen takes (for the warning that says so)."""
        return "it gets the identity metric"

    def directs_always(self, bank: Bank) -> bool:
        """Whether every layer of ``bank`` takes this direction on every step, with input or
        without: a step rule that copies directions (``orth``) keeps no Adam moment for its
        weights (:class:`hf_slnb.step_rules.OrthAdam`). A fact of the bank and the options
        (the arenas are laid out by it: :attr:`hf_slnb.slabs.Arena.directed`)."""
        return False

    def commit(self, bank: Bank, h: Stack, mask: Tensor) -> None:
        """Keep what the next step needs (a warm start), for the layers in ``mask``."""

    def solve(self, ctx: StepContext, bank: Bank, g: Stack, stats: Any) -> Stack:
        """The direction of one bank's stacked gradients (whole layers)."""
        return g


class Diagonal(Direction):
    """SLNB's diagonal incomplete-Cholesky inverse of the input metric: ``h = P g``."""

    name = "diagonal"

    def solve(self, ctx: StepContext, bank: Bank, g: Stack, stats: Any) -> Stack:
        return bank.neurons[0].precondition_stacked(g, stats.mu, stats.inv)


class PCG(Direction):
    """Warm-started preconditioned conjugate gradient on ``(J^T J / N + ridge) h = g``."""

    name = "pcg"
    state_keys = ("solution",)

    def solve(self, ctx: StepContext, bank: Bank, g: Stack, stats: Any) -> Stack:
        group = ctx.group_of_bank(bank)
        x0s = bank.layout.gather(bank, bank.solutions(ctx.bank_grads(bank)))
        metric = bank.neurons[0].stacked_metric(bank, stats, self._ridges(group, stats))
        if metric is not None:  # every layer has its explicit second moment: one batched solve
            h, rel = conjugate_gradient(
                metric, g, x0s, lambda v: bank.neurons[0].precondition_stacked(
                    v, stats.mu, stats.inv), group["cg_iters"], self.config.cg_tol,
                bank.layout.inner)
            ctx.residuals.append(rel.max())
            return h
        return self._layer_by_layer(ctx, bank, g, stats, group, x0s)

    def _ridges(self, group: dict[str, Any], stats: Any) -> Any:
        if self.config.ridge_mode == "relative":  # scale-free: relative to the feature energy
            return stats.nu.mean(-1) * group["ridge"]
        return group["ridge"]

    def _layer_by_layer(self, ctx: StepContext, bank: Bank, g: Stack, stats: Any,
                        group: dict[str, Any], x0s: Stack) -> Stack:
        """Matrix-free products (kept inputs, convolutions): one solve per layer."""
        outs: list[list[Tensor]] = [[] for _ in g]
        rels = []
        for i, neuron in enumerate(bank.neurons):
            gi = tuple(t[i:i + 1] for t in g)
            if neuron.capture is None:  # no input: identity metric, nothing else touched
                for o, t in zip(outs, gi):
                    o.append(t)
                continue
            ridge: Any = group["ridge"]
            if self.config.ridge_mode == "relative":  # scale-free: relative to the feature energy
                ridge = stats.nu[i].mean() * ridge
            neuron.prepare(ridge, stats.n_out[i, 0, 0])
            mu, inv = stats.mu[i:i + 1], stats.inv[i:i + 1]

            def matvec(v: Stack, n: Any = neuron) -> Stack:
                return tuple(t[None] for t in n.metric(tuple(t[0] for t in v)))

            def precond(v: Stack, n: Any = neuron, mu: Tensor = mu, inv: Tensor = inv) -> Stack:
                return n.precondition_stacked(v, mu, inv)

            x0 = tuple(t[i:i + 1] for t in x0s)
            sol, rel = conjugate_gradient(matvec, gi, x0, precond, group["cg_iters"],
                                          self.config.cg_tol, bank.layout.inner)
            rels.append(rel)
            for o, t in zip(outs, sol):
                o.append(t)
        h = tuple(torch.cat(o) for o in outs)
        if rels:
            ctx.residuals.append(torch.cat(rels).max())
        return h

    def commit(self, bank: Bank, h: Stack, mask: Tensor) -> None:
        bank.keep_solutions(h, mask)


class WhitenedOrth(Direction):
    """Orthogonalisation in whitened coordinates (issue 13): ``orth(G C^{-1/2}) C^{-1/2}``.

    ``C`` is each layer's centred input covariance (an EMA, decay :attr:`decay`, damped by
    :attr:`damping` times its mean eigenvalue). A whitening factor ``W`` of it (``Wᵀ C W =
    I``) is refreshed every ``whiten_every`` steps and the update is ``orth(G W) Wᵀ``, the same
    map for every such ``W`` (:mod:`hf_slnb.whitened`): ``C^{-1/2}`` by coupled Newton-Schulz on
    accelerators (matmuls only: no host sync) and ``L^{-T}`` from the Cholesky factor ``C = L
    Lᵀ`` on the CPU (:func:`hf_slnb.whitened.whitener_cholesky`: a sixth of ``eigh``'s cost,
    which the CPU took before 2026-12-05). Both are kept as ``input_inv_sqrt``. With ``C = I``
    this is Muon's direction; it is Muon on the network whose layers whiten their inputs, which is
    SLNB's reparameterisation view. The result is scaled to Muon's size (``|orth(.)|_F``), then
    to an RMS of 0.2 (Moonlight's rule, ``0.2 sqrt(max(out, in))``: AdamW's typical update RMS,
    so ``lr`` is AdamW's for every parameter). The orthogonalisation runs in ``orth_dtype``: by
    default bfloat16 on accelerators, as Muon, and on the CPU bfloat16 for layers whose short
    side is at least 128 where it has native bfloat16 instructions (elongated ones: AMX),
    float32 otherwise (:meth:`orth_dtype`; float64 parameters stay float64). Applies to the
    ``nn.Linear`` and HF ``Conv1D`` layers that ``orth_layers`` picks (by default those inside
    the repeated blocks: a classifier or pooler beside them is left out, as Muon's authors leave
    out everything but the hidden matrices); embeddings, heads and convolutions keep ``g`` (the
    step rule then gives them Adam's step), or with ``orth_rest='diagonal'`` take SLNB's
    diagonal direction (:meth:`rest`). An FSDP2-sharded layer is gathered whole for its
    orthogonalisation on every rank, each keeping its shard (as Muon under FSDP2); its
    covariance is replicated. An input wider than ``max_block`` is whitened in diagonal blocks
    (:meth:`blocks`: ``C`` is then the block diagonal of the covariance, state ``(blocks, b, b)``
    per layer). Needs each layer's ``sum x x^T`` (its diagonal blocks).
    """

    name = "whitened_orth"
    state_keys = ("input_cov", "input_inv_sqrt")
    decay, damping, ns_iters = 0.95, 0.1, 20

    def takes(self, neuron: Any) -> bool:
        """Whether ``neuron`` is one of the layers this direction orthogonalises
        (``orth_layers``: the hidden ``Linear``/``Conv1D`` layers inside repeated blocks, or
        all of them)."""
        return (neuron.kind in ("linear", "conv1d_hf") and not getattr(neuron, "is_head", False)
                and (self.config.orth_layers == "hidden" or getattr(neuron, "in_block", True)))

    def bank_key(self, neuron: Any) -> tuple[Any, ...]:
        return (self.takes(neuron),)

    def applies(self, bank: Bank) -> bool:
        return self.takes(bank.neurons[0])

    @staticmethod
    def size(m: Tensor) -> float:
        """The factor that gives an orthogonalised ``(L, out, in)`` stack (RMS about
        ``1 / sqrt(max(out, in))``) the RMS :data:`RMS`: Moonlight's match to AdamW's update."""
        return RMS * math.sqrt(max(m.shape[1], m.shape[2]))

    def needs_moments(self, neuron: Any) -> bool:
        return self.takes(neuron)

    def wants_input(self, neuron: Any, index: int) -> bool:
        """A layer it orthogonalises: at the covariance's updates (:meth:`updates_covariance`);
        any other only with ``orth_rest='diagonal'`` (with ``'adam'`` nothing reads its
        input)."""
        if not self.takes(neuron):
            return self.config.orth_rest == "diagonal"
        return self.updates_covariance(index)

    def updates_covariance(self, index: int) -> bool:
        """Whether step ``index`` updates the covariances (one of every ``cov_every``)."""
        return index % self.config.cov_every == 0

    def orth_dtype(self, m: Tensor) -> torch.dtype:
        """The Newton-Schulz dtype for the stack ``m`` (``orth_dtype``; 'auto' on a CPU with
        native bfloat16: bfloat16 for the layers whose short side is at least
        :data:`hf_slnb.whitened.BF16_CPU_MIN`, which Newton-Schulz iterates there at about
        twice float32's speed; elongated ones only on an AMX CPU (round 12), where that also
        beats float32's eigendecomposition of their Gram matrix, the CPU's float32 form for
        them, and float32 elsewhere)."""
        short, long = sorted(m.shape[-2:])
        return W.ns_dtype(m.dtype, m.device, self.config.orth_dtype,
                          bf16_pays=short >= W.BF16_CPU_MIN
                          and (long < GRAM_ASPECT * short or W.amx_cpu()))

    def blocks(self, neuron: Any) -> tuple[int, int]:
        """``(blocks, width)`` of the diagonal blocks ``neuron``'s input is whitened in
        (``max_block``; one block of every feature up to it)."""
        return W.block_shape(neuron.num_features, self.config.max_block)

    def state_shape(self, neuron: Any) -> tuple[int, ...]:
        """The shape of a layer's ``input_cov`` and ``input_inv_sqrt``: ``(d, d)``, or
        ``(blocks, width, width)`` for an input whitened in blocks."""
        k, b = self.blocks(neuron)
        return (b, b) if k == 1 else (k, b, b)

    def whitening(self, bank: Bank) -> tuple[Tensor, Tensor]:
        """The bank's covariance EMAs and inverse roots, ``(L, blocks, width, width)``."""
        return bank_whitening(bank, *self.blocks(bank.neurons[0]))

    def bank_state(self, bank: Bank) -> dict[str, Tensor]:
        if not self.applies(bank):
            return {}
        cov, root = self.whitening(bank)
        if cov.shape[1] == 1:  # one block: (L, d, d) views, the format of every checkpoint
            cov, root = cov[:, 0], root[:, 0]
        return {"input_cov": cov, "input_inv_sqrt": root}

    def compute(self, ctx: StepContext) -> None:
        owners = self.owners(ctx)
        for bank in ctx.banks:
            if not self.applies(bank):
                self.rest(ctx, bank)
                continue
            owner = owners.get(id(bank))
            if self.updates_covariance(ctx.index):
                self.update_covariance(ctx, bank, owner)
            # Every layer takes its root as it stands, with input this step or without (Muon
            # orthogonalises every momentum): its step never falls back to Adam's.
            ctx.take_all(bank)
            self.set_direction(ctx, bank, bank.all_layers,
                               lambda m, rows, size, out, b=bank: self.orthogonalise(
                                   b, m, rows, size, out), owner)

    def directs_always(self, bank: Bank) -> bool:
        return self.applies(bank)

    def without_input(self, neuron: Any) -> str:
        if not self.takes(neuron):
            return super().without_input(neuron)
        return ("it is orthogonalised with its input whitening as it stands (none until it "
                "sees input: Muon's step)")

    def update_covariance(self, ctx: StepContext, bank: Bank, owner: int | None) -> None:
        """This step's ``x xᵀ`` into the covariance EMAs of the bank's layers with input (the
        roots refreshed when due); nothing where none saw input."""
        if bank.grams is None or not any(n.captured for n in bank.neurons):
            return
        stats = ctx.fold(bank)  # the mask of layers with input: no preconditioner terms
        cov = self.whitening(bank)[0]  # (L, k, b, b): k diagonal blocks of width b
        L, k, b = cov.shape[:3]
        counts = ctx.counts[id(bank)][0]  # (L, 1, 1)
        keep = stats.active & ctx.live
        mask = not (cpu_path(keep.device) and bool(keep.all()))  # the CPU reads it freely
        refresh = bank.whiten_steps % self.refresh_every == 0  # host counter: no sync
        bias = 1.0 - self.decay ** bank.stat_step.clamp(min=1.0).to(cov.dtype)[..., None]
        sum_x = bank.sum_x  # (L, d), as the blocks' (L, k, b), zero-padded
        if k * b != sum_x.shape[-1]:
            sum_x = torch.nn.functional.pad(sum_x, (0, k * b - sum_x.shape[-1]))
        sum_x = sum_x.view(L, k, b)
        # Batched over the bank's layers, in chunks whose (l, k, b, b) temporaries stay
        # under COV_CHUNK_BYTES: a few ops per chunk, not per layer, and a bounded temporary.
        for rows in layer_chunks(L, b, cov.element_size(), k):
            c = symmetrize_(bank.grams[rows])  # this step's x xᵀ sums, in place: the
            # bank's sums are zeroed after the step
            W.centre_(c, sum_x[rows], counts[rows])
            # A layer outside ``keep`` takes its own covariance: lerp(C, C, w) is C exactly.
            if mask:
                torch.where(keep[rows, None, None, None], c, cov[rows], out=c)
            cov[rows].lerp_(c, 1.0 - self.decay)
        if refresh:
            self.refresh(ctx, bank, bias, owner)
        bank.whiten_steps += 1

    @property
    def refresh_every(self) -> int:
        """Covariance updates between refreshes of the roots: as many as fit in
        ``whiten_every`` steps (at least one), so that no root is older than that. (Rounding
        up instead, a root every 12 steps for ``cov_every=3`` or 4, ended the Llama 0.01 higher
        on both seeds: BENCHMARKS.md, issue 13, round 15.)"""
        return max(1, self.config.whiten_every // self.config.cov_every)

    def rest(self, ctx: StepContext, bank: Bank) -> None:
        """A bank this direction does not orthogonalise: ``h = g`` (then Adam's step), or with
        ``orth_rest='diagonal'`` SLNB's diagonal direction, marked for Adam's length per output
        row (:attr:`StepContext.grafted`)."""
        if self.config.orth_rest != "diagonal" or not ctx.captured[id(bank)]:
            return
        stats = ctx.statistics(bank)
        h = bank.layout.solve(bank, ctx.bank_grads(bank), lambda gs, b=bank, s=stats:
                              b.neurons[0].precondition_stacked(gs, s.mu, s.inv))
        ctx.set_bank_direction(bank, h, stats.active)
        ctx.grafted.update(id(s) for s in ctx.bank_slabs(bank))

    def owners(self, ctx: StepContext) -> dict[int, int]:
        """With ``orth_split`` under FSDP2: the rank (of the shard group) that orthogonalises
        each sharded layer this direction takes, round robin in the banks' order (the same on
        every rank). Empty otherwise: every rank then orthogonalises every sharded layer."""
        world = distributed.world_size(ctx.shard_group)
        if not self.config.orth_split or ctx.shard_group is None or world == 1:
            return {}
        sharded = [b for b in ctx.banks if b.layout.sharded and self.applies(b)]
        return {id(b): i % world for i, b in enumerate(sharded)}

    def refresh(self, ctx: StepContext, bank: Bank, bias: Tensor, owner: int | None = None
                ) -> None:
        """Each layer's whitening factor (``C^{-1/2}``, or ``L^{-T}`` on the CPU: the class's
        docstring) from its damped, bias-corrected covariance EMA, in chunks of layers
        (:func:`layer_chunks`). In data parallel with ``orth_split``, each rank refreshes
        its share of the bank's layers and the roots are all-gathered (bit for bit the same);
        a sharded layer's ``owner`` refreshes it and broadcasts the root. The orthogonalisation
        reads only the roots its rank refreshed; the gather keeps every rank's state whole, for
        a checkpoint saved from one rank."""
        cov, root = self.whitening(bank)
        split = self.splits(ctx, bank)
        mine = distributed.share(len(root), ctx.data_group) if split else slice(0, len(root))
        if owner is not None and distributed.rank(ctx.shard_group) != owner:
            mine = slice(0, 0)
        features = bank.neurons[0].num_features
        seen = bank.stat_step[..., None] > 0  # (L, 1, 1, 1): a layer whose covariance is still
        # zero (no step has given it input) keeps its root, the identity: C^{-1/2} of a zero C
        # would be the eigenvalue floor's, about 1e19 in float32
        for rows in layer_chunks(mine.stop - mine.start, cov.shape[-1], cov.element_size(),
                                 cov.shape[1]):
            rows = slice(mine.start + rows.start, mine.start + rows.stop)
            damped = W.damp_blocks(cov[rows] / bias[rows], self.damping, features)
            keep = seen[rows]
            if damped.device.type == "cpu":  # Cholesky: a sixth of eigh's cost, 1/50 of NS's
                fresh, ok = whiteners_once(damped)
                keep = keep & ok[..., None, None]  # a zero input's C is not positive definite
            else:  # matmuls only: a factorisation's error check would wait for the device
                fresh = W.inverse_sqrt_newton_schulz(damped, self.ns_iters)
            torch.where(keep, fresh, root[rows], out=root[rows])
        if split:
            root.copy_(distributed.all_gather_shares(root[mine], len(root), ctx.data_group))
        elif owner is not None:
            distributed.broadcast_from(root, owner, ctx.shard_group)

    def splits(self, ctx: StepContext, bank: Bank) -> bool:
        """Whether the ranks share this bank's layers out (``orth_split``, data parallel)."""
        return (self.config.orth_split and not bank.layout.sharded and len(bank.neurons) > 1
                and distributed.world_size(ctx.data_group) > 1)

    def set_direction(self, ctx: StepContext, bank: Bank, active: Tensor,
                      orth: Callable[[Tensor, slice, float, Tensor | None], Tensor],
                      owner: int | None = None) -> None:
        """The bank's weights take ``orth(m, rows, size, out)`` (the layers ``rows`` of the bank,
        their ``(l, out, in)`` stack ``m``, at :meth:`size`, written into ``out`` when that is not
        ``None``: the update buffer, so that the step rule copies nothing and the rescaling is
        the one pass that writes it); the biases keep ``g``. A sharded layer
        (FSDP2) is orthogonalised whole, as an orthogonalisation does not split by rows: its
        ``owner`` gathers it, orthogonalises it and scatters the shards back (``orth_split``),
        or, without an owner, every rank gathers it and keeps its shard. In data parallel, with
        ``orth_split``, each rank orthogonalises its share of the bank's layers and the shares
        are all-gathered."""
        last = bank.neurons[0].feature_axis == 1
        split = self.splits(ctx, bank)

        out = ctx.direct_out(bank) if owner is None else None

        def whole(g: Stack) -> Stack:
            m = g[0] if last else g[0].transpose(1, 2)  # (L, out, in)
            target = None if out is None else out if last else out.transpose(1, 2)
            if split:
                rows = distributed.share(len(m), ctx.data_group)
                u = distributed.all_gather_shares(orth(m[rows], rows, self.size(m), None),
                                                  len(m), ctx.data_group)
                if target is not None:
                    target.copy_(u)
            else:
                u = orth(m, slice(None), self.size(m), target)
            if target is not None:  # straight into the update buffer: the rule copies nothing
                return (out,)
            return (u if last else u.transpose(1, 2),)

        if owner is None:
            h = bank.layout.solve_whole(bank, ctx.bank_grads(bank)[:1], whole)[0]
        else:  # one layer: gathered on its owner, its shards scattered back
            g, w = ctx.bank_grads(bank)[0][0], bank.neurons[0].weight
            full = distributed.gather_rows_to(g, w, owner, ctx.shard_group)
            u = whole((full[None],))[0][0] if full is not None else None
            h = distributed.scatter_rows_from(u, w, owner, ctx.shard_group, g)[None]
        ctx.set_slab_direction(bank, h, active)

    def orthogonalise(self, bank: Bank, m: Tensor, rows: slice = slice(None), size: float = 1.0,
                      out: Tensor | None = None) -> Tensor:
        """``orth(M C^{-1/2}) C^{-1/2}`` at Muon's size times ``size`` for the stack ``m`` ``(L,
        out, in)``, into ``out`` if given (:func:`hf_slnb.whitened.whitened_orth`). On
        the CPU in float32 or float64, for layers whose short side is at least
        :data:`SPECTRAL_MIN` (any aspect) or that are at least :data:`GRAM_ASPECT` times longer
        than wide, from the eigendecomposition of the short side's Gram matrix
        (:func:`hf_slnb.whitened.whitened_orth_gram` with ``spectral``: the same map, about half
        the cost or less), unless it runs in bfloat16 (:meth:`orth_dtype`). Otherwise, and on
        accelerators, by Newton-Schulz on ``M C^{-1/2}`` itself. The Gram form is not iterated:
        where ``M C^{-1/2}`` has a null direction (a
        layer fed by a LayerNorm, whose outputs lie in a hyperplane), its iterated polynomial
        grows about 500-fold there and float32 rounding leaks from it into the update (7% on a
        (300, 8) layer, against 1e-4 for the eigendecomposition and 2e-5 iterating on
        ``M C^{-1/2}``)."""
        dtype = self.orth_dtype(m)
        short, long = sorted(m.shape[1:])
        self.whitening(bank)  # the roots (the identity before any input)
        root = bank_root(bank, dtype)  # the rows' roots are r: (l, d, d) for one block,
        one = root.shape[1] == 1  # else (l, k, b, b) blocks
        r = root[rows, 0] if one else root[rows]
        if (m.device.type != "cpu" or dtype == torch.bfloat16
                or not (short >= SPECTRAL_MIN or long >= GRAM_ASPECT * short)):
            return W.whitened_orth(m, r, dtype=dtype, size=size, out=out)
        inv = None
        if m.shape[1] <= m.shape[2]:
            inv = bank_inverse(bank)[rows]
            inv = (inv[:, 0] if one else inv).to(dtype)
        u = W.whitened_orth_gram(m.to(dtype), r, inv, spectral=True, size=size, out=out)
        return u if out is not None else u.to(m.dtype)


class DiagWhitenedOrth(WhitenedOrth):
    """:class:`WhitenedOrth` with the diagonal of the input metric: ``orth(G D^{-1/2}) D^{-1/2}``.

    ``D`` is SLNB's diagonal preconditioner's denominator (each feature's variance with
    ``shrinkage`` of the mean variance mixed in; the mean square where a layer has no bias), from
    the per-feature sums every preset keeps: no ``x xᵀ``, no inverse root, so its cost is Muon's.
    """

    name = "diag_whitened_orth"
    state_keys = ()

    # A layer without input keeps g (Adam's step), as SLNB's other directions do.
    directs_always = Direction.directs_always
    without_input = Direction.without_input

    def needs_moments(self, neuron: Any) -> bool:
        return False

    def updates_covariance(self, index: int) -> bool:
        return True  # its diagonal statistics are read every step

    def bank_state(self, bank: Bank) -> dict[str, Tensor]:
        return {}

    def compute(self, ctx: StepContext) -> None:
        owners = self.owners(ctx)
        for bank in ctx.banks:
            if not self.applies(bank):
                self.rest(ctx, bank)
                continue
            if not ctx.captured[id(bank)]:
                continue  # identity: h = g
            stats = ctx.statistics(bank)
            self.set_direction(ctx, bank, stats.active,
                               lambda m, rows, size, out, s=stats: W.diag_whitened_orth(
                                   m, s.inv[rows].to(m.dtype).sqrt(), dtype=self.orth_dtype(m),
                                   size=size, out=out),
                               owners.get(id(bank)))


#: On the CPU, layers at least this many times longer than wide are orthogonalised on their Gram
#: matrix's eigendecomposition whatever their size.
GRAM_ASPECT = 1.5
#: On the CPU, layers whose short side is at least this take the Gram matrix's eigendecomposition
#: (any aspect): there ``eigh`` of a (256, 256) matrix costs about ten of its products, against
#: the iteration's seventeen (twenty at 128: no gain below about 192).
SPECTRAL_MIN = 192


#: The largest ``(l, d, d)`` temporary of a bank's covariance update: its layers are batched in
#: chunks of this size (MiniLM's six 1536-wide layers, 56 MB, are one chunk).
COV_CHUNK_BYTES = 64 << 20


def layer_chunks(layers: int, d: int, itemsize: int, blocks: int = 1) -> list[slice]:
    """Consecutive slices of ``layers`` whose ``(l, blocks, d, d)`` stacks fit
    :data:`COV_CHUNK_BYTES` (at least one layer each)."""
    per = max(1, COV_CHUNK_BYTES // max(1, blocks * d * d * itemsize))
    return [slice(lo, min(layers, lo + per)) for lo in range(0, layers, per)]


def whiteners_once(damped: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`hf_slnb.whitened.whitener_cholesky` of each of the CPU stack ``damped`` ``(l,
    ...)``, computed once for consecutive layers whose matrices are equal, bit for bit: the
    layers that read one input (a Llama's or BERT's q/k/v, a Llama's gate/up) keep one
    covariance, and sit side by side in their bank. The same factors as one per layer; on the
    0.9M Llama 12 factorisations of 128 features instead of 24. (A host comparison per layer:
    the CPU's own path alone.)"""
    if not cpu_path(damped.device):  # the CPU standing in for an accelerator: no host read
        return W.whitener_cholesky(damped)
    new = [i == 0 or not torch.equal(damped[i], damped[i - 1]) for i in range(len(damped))]
    if all(new):
        return W.whitener_cholesky(damped)
    w, ok = W.whitener_cholesky(damped[[i for i, first in enumerate(new) if first]])
    runs = [k - 1 for k in itertools.accumulate(new)]  # each layer: its run's factor
    return w[runs], ok[runs]


def bank_inverse(bank: Bank) -> Tensor:
    """``C⁻¹ = W Wᵀ`` of the bank's whitening factors, cached until they change (a refresh or a
    load writes into them and bumps their version counter: a host fact, no sync)."""
    key = (bank.root._version, bank.root.data_ptr())
    if getattr(bank, "inv_key", None) != key:
        bank.inv = torch.matmul(bank.root, bank.root.mT)
        bank.inv_key = key
    return bank.inv


def bank_root(bank: Bank, dtype: torch.dtype) -> Tensor:
    """The bank's inverse roots in ``dtype`` (bfloat16 for Newton-Schulz; the roots themselves
    in their own dtype). On the CPU cast once per refresh and cached like
    :func:`bank_inverse`: 2 bytes per root entry held between steps for one cast per bank
    fewer per step. On accelerators cast at each step: a cheap pass there, and memory is what
    runs out first (the cache would hold half the roots' size again)."""
    if dtype == bank.root.dtype:
        return bank.root
    if bank.root.device.type != "cpu":
        return bank.root.to(dtype)
    key = (bank.root._version, bank.root.data_ptr(), dtype)
    if getattr(bank, "root_cast_key", None) != key:
        bank.root_cast = bank.root.to(dtype)
        bank.root_cast_key = key
    return bank.root_cast


def bank_whitening(bank: Bank, blocks: int = 1, width: int | None = None
                   ) -> tuple[Tensor, Tensor]:
    """The bank's input covariance EMAs ``(L, blocks, width, width)`` (the diagonal blocks of
    each layer's, :func:`hf_slnb.whitened.block_shape`; one ``(d, d)`` block by default) and
    their inverse roots (identity first)."""
    if getattr(bank, "cov", None) is None:
        L = len(bank.neurons)
        b = bank.neurons[0].num_features if width is None else width
        bank.cov = torch.zeros(L, blocks, b, b, dtype=bank.dtype, device=bank.device)
        bank.root = torch.eye(b, dtype=bank.dtype, device=bank.device).repeat(L, blocks, 1, 1)
        bank.whiten_steps = 0
    return bank.cov, bank.root


#: The registered directions, by name.
DIRECTIONS: dict[str, type[Direction]] = {}


def register_direction(cls: type[Direction]) -> type[Direction]:
    """Register a direction class under its ``name`` (``ValueError`` if taken)."""
    return register(DIRECTIONS, cls, "direction")


for _cls in (Direction, Diagonal, PCG, WhitenedOrth, DiagWhitenedOrth):
    register_direction(_cls)


def direction_for(config: Any) -> Direction:
    """The direction a configuration asks for."""
    return DIRECTIONS[config.direction](config)


__all__ = [
    "DIRECTIONS",
    "PCG",
    "Diagonal",
    "Direction",
    "direction_for",
    "per_layer",
    "register_direction",
]
