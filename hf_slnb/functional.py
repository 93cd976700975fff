"""SLNB's maths as pure functions on stacks: tensors ``(L, ...)`` holding ``L`` equal-shape things.

Layers of one shape are one stack, so one kernel serves them all; per-layer scalars (bias
corrections, step sizes) broadcast along the stack axis. Nothing here knows modules, hooks or
optimizer state, and nothing here waits for the device:

- no ``.item()``, ``bool()`` or ``float()`` of a device tensor, no ``bincount``/``nonzero``;
- decisions that depend on values (a layer that saw no input, a converged conjugate gradient, a
  non-finite gradient) are device masks applied with ``torch.where``, never Python branches.

Vectors of one layer are tuples ``(weight,)`` or ``(weight, bias)``; stacked, each has the stack
axis first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

Vec = tuple[Tensor, ...]
Stack = tuple[Tensor, ...]


def per_layer(s: Tensor, like: Tensor) -> Tensor:
    """``(L,)`` values shaped to broadcast over a stack ``like`` of shape ``(L, ...)``."""
    return s.reshape(s.shape + (1,) * (like.dim() - s.dim()))


def denominator_floor(dtype: torch.dtype) -> float:
    """Smallest preconditioner denominator allowed: guards a feature set that is all constant."""
    return torch.finfo(dtype).tiny ** 0.5


def bias_correction(decay: float, steps: Tensor) -> Tensor:
    """``1 - decay^t`` for step counts ``t`` (a device tensor; ``t = 0`` gives 1, not 0)."""
    return torch.pow(decay, torch.clamp(steps, min=1.0)).neg_().add_(1.0)


# -- feature statistics and the diagonal preconditioner -----------------------------------------
def feature_statistics_(
    stats: Tensor, step: Tensor, sums: Tensor, count: Tensor, live: Tensor, decays: Tensor,
    weights: Tensor, shrinkage: float, has_bias: bool, captured: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fold one step's sums of ``L`` layers into their EMAs and build the preconditioner terms.

    A layer that saw no input (``count == 0``) or a step that is skipped (``live`` false) leaves
    the EMAs and the step count bit for bit.

    Args:
        stats: EMAs ``(L, 2, d)`` of the feature means and mean squares, updated in place.
        step: Steps with input ``(L, 1, 1)`` (float64), updated in place.
        sums: This step's sums ``(L, 2, d)`` of the features and their squares, over ``count``
            input positions ``(L, 1, 1)``.
        live: 0-d bool, false on a skipped step.
        decays: The two EMA decays ``(1, 2, 1)`` (float64), each in ``[0, 1)``.
        weights: ``1 - decays`` in ``stats``' dtype.
        shrinkage: Share of the mean variance mixed into every variance, in ``[0, 1)``.
        has_bias: Whether the layers have a bias (their input is ``[x; 1]``).
        captured: Every layer saw input (a host fact): no per-layer mask is needed.

    Returns:
        ``(mu_hat, nu_hat, inv_denom, active)``: bias-corrected EMAs ``(L, d)``, the reciprocal
        of the preconditioner's denominator ``(L, d)`` and the mask of layers with input,
        ``(L, 1, 1)`` (or the 0-d ``live`` when ``captured``); rows of inactive layers are
        meaningless.
    """
    active = fold_statistics_(stats, step, sums, count, live, weights, captured)
    return (*preconditioner_terms(stats, step, decays, shrinkage, has_bias), active)


def fold_statistics_(stats: Tensor, step: Tensor, sums: Tensor, count: Tensor, live: Tensor,
                     weights: Tensor, captured: bool = False) -> Tensor:
    """The first half of :func:`feature_statistics_` (the same arguments): this step's sums
    folded into the EMAs and the step counts, in place; returns the mask of layers with input.
    A direction that reads only that mask (``whitened_orth``) stops here: three fewer passes
    than the preconditioner's terms take, and a dozen fewer ops per bank."""
    active = live if captured else (count > 0) & live
    step.add_(active)
    mean = sums / (count if captured else torch.clamp(count, min=1.0))
    torch.where(active, torch.lerp(stats, mean, weights), stats, out=stats)
    return active


def preconditioner_terms(stats: Tensor, step: Tensor, decays: Tensor, shrinkage: float,
                         has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The second half of :func:`feature_statistics_`: ``(mu_hat, nu_hat, inv_denom)`` from the
    EMAs as they stand."""
    bc = torch.pow(decays, torch.clamp(step, min=1.0)).neg_().add_(1.0)
    mu, nu = (stats / bc.to(stats.dtype)).unbind(1)
    var = torch.clamp(torch.addcmul(nu, mu, mu, value=-1.0), min=0.0)
    var = torch.lerp(var, var.mean(-1, keepdim=True), shrinkage)
    denom = var if has_bias else torch.addcmul(var, mu, mu)
    inv = torch.reciprocal(torch.clamp(denom, min=denominator_floor(denom.dtype)))
    return mu, nu, inv


def precondition_stacked(v: Stack, mu: Tensor, inv_denom: Tensor, feature_axis: int) -> Stack:
    """The diagonal incomplete-Cholesky preconditioner of ``L`` same-shape 2-D layers at once.

    Args:
        v: ``(W,)`` or ``(W, b)``: stacked weights ``(L, a, b)`` and biases ``(L, out)``.
        mu: Bias-corrected feature means ``(L, d)``.
        inv_denom: Reciprocal preconditioner denominators ``(L, d)``.
        feature_axis: The weight's feature axis without the stack axis: 1 for ``(out, in)``,
            0 for ``(in, out)``.

    Returns:
        ``W' = (W - mu b) / denom``, ``b' = b - sum(mu W')`` with a bias; ``W' = W / denom``
        without one.
    """
    w = v[0]
    inv = inv_denom[:, None, :] if feature_axis == 1 else inv_denom[:, :, None]
    if len(v) == 1:
        return (w * inv,)
    b = v[1]
    if feature_axis == 1:  # (L, out, in)
        w2 = torch.baddbmm(w, b[:, :, None], mu[:, None, :], alpha=-1.0).mul_(inv)
        return (w2, torch.baddbmm(b[:, :, None], w2, mu[:, :, None], alpha=-1.0)[:, :, 0])
    w2 = torch.baddbmm(w, mu[:, :, None], b[:, None, :], alpha=-1.0).mul_(inv)  # (L, in, out)
    return (w2, torch.baddbmm(b[:, None, :], mu[:, None, :], w2, alpha=-1.0)[:, 0, :])


# -- conjugate gradient with device masks -----------------------------------------------------
def stacked_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Per-layer inner products ``(L,)`` of two stacked vectors."""
    out = None
    for x, y in zip(a, b):
        q = torch.linalg.vecdot(x.flatten(1), y.flatten(1))
        out = q if out is None else out + q
    return out  # type: ignore[return-value]


def conjugate_gradient(
    matvec: Callable[[Stack], Stack], b: Stack, x0: Stack | None,
    precond: Callable[[Stack], Stack], iters: int, tol: float,
    inner: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor] = stacked_dot,
) -> tuple[Stack, Tensor]:
    """PCG for ``L`` independent systems ``A x = b`` at once, stopped by device masks only.

    Each system runs at most ``iters`` iterations and stops before an iteration once
    ``|r|^2 <= tol^2 |b|^2``: from then on its ``alpha`` and ``beta`` are 0, so it keeps its
    solution exactly, without a host read to decide the exit.

    Args:
        matvec: ``V -> A V`` on stacked vectors (each layer its own SPD ``A``).
        b: Stacked right-hand sides.
        x0: Stacked warm starts, or ``None`` for zeros.
        precond: ``R -> P R`` on stacked vectors (``P`` SPD, close to ``A^-1``).
        iters: Iterations (``>= 0``).
        tol: Relative residual at which a system stops.
        inner: Per-layer inner product (a sharded layer passes one summed over its shards).

    Returns:
        The stacked solutions and each system's relative residual ``(L,)``.
    """
    bb = inner(b, b)
    if x0 is None:
        x = [torch.zeros_like(t) for t in b]
        r = [t.clone() for t in b]
    else:
        x = [t.clone() for t in x0]
        r = [bi - ai for bi, ai in zip(b, matvec(tuple(x)))]
    rr = inner(r, r)
    threshold = (tol * tol) * bb
    active = rr > threshold
    zero = torch.zeros_like(rr)
    if iters > 0:
        p = list(precond(tuple(r)))
        rz = inner(r, p)
        for i in range(iters):
            ap = matvec(tuple(p))
            alpha = torch.where(active, rz / inner(p, ap), zero)
            for xi, ri, pi, api in zip(x, r, p, ap):
                a = per_layer(alpha, xi)
                xi.addcmul_(a, pi)
                ri.addcmul_(a, api, value=-1.0)
            rr = inner(r, r)
            active = active & (rr > threshold)
            if i == iters - 1:
                break
            z = precond(tuple(r))
            rz_new = inner(r, z)
            beta = torch.where(active, rz_new / rz, zero)
            p = [torch.addcmul(zi, per_layer(beta, zi), pi) for zi, pi in zip(z, p)]
            rz = torch.where(active, rz_new, rz)  # a stopped system: no 0/0 in later alphas
    rel = torch.sqrt(rr / torch.clamp(bb, min=torch.finfo(bb.dtype).tiny))
    return tuple(x), rel


# -- step rules -------------------------------------------------------------------------------
def row_norms(t: Tensor, dims: Sequence[int]) -> Tensor:
    """Norms over ``dims`` (unstacked axes) of a stack, kept for broadcasting."""
    return torch.linalg.vector_norm(t, dim=[d + 1 for d in dims], keepdim=True)


def graft_ratio(adam: Tensor, h: Tensor) -> Tensor:
    """``|adam| / |h|`` from norms (``|h|`` floored at the dtype's tiny)."""
    return adam / torch.clamp(h, min=torch.finfo(h.dtype).tiny)


# -- the non-finite skip as a mask ------------------------------------------------------------
#: Whether the CPU takes its own, faster paths where an accelerator's would cost it more: the
#: non-finite check by ``aminmax`` (:func:`nonfinite_flags`), and branches on a step's flags read
#: on the host, which waits for nothing there (``StepContext``: ``arena.all_live``). The numbers
#: are the same bit for bit. ``scripts/benchmark_step.py --count-ops`` turns it off, so that its
#: counts of ops and syncs on the CPU are an accelerator's.
CPU_PATHS = True


def cpu_path(device: torch.device) -> bool:
    """Whether work on ``device`` takes the CPU's own path (:data:`CPU_PATHS`)."""
    return CPU_PATHS and device.type == "cpu"


@contextlib.contextmanager
def accelerator_paths() -> Iterator[None]:
    """Within the block the CPU takes an accelerator's paths (:data:`CPU_PATHS` off), so that
    what it dispatches and whether it syncs are an accelerator's."""
    global CPU_PATHS
    saved, CPU_PATHS = CPU_PATHS, False
    try:
        yield
    finally:
        CPU_PATHS = saved


def _on_cpu(tensors: list[Tensor]) -> bool:
    return bool(tensors) and cpu_path(tensors[0].device)


def nonfinite_flags(tensors: list[Tensor]) -> Tensor:
    """``(n,)`` bool: whether each (non-empty) tensor holds an inf or NaN. Exact: neither test
    can overflow on large finite values, as a 2-norm could. On accelerators the max-abs norm
    (one multi-tensor kernel); on the CPU each tensor's minimum and maximum (``aminmax``: a NaN
    propagates, an inf is one of the two), 25x faster there than that norm (MiniLM's 22.7M
    gradients: 4 ms against 110 ms)."""
    if _on_cpu(tensors):
        ends = torch.stack([v for t in tensors for v in torch.aminmax(t)])
        return ends.isfinite().view(-1, 2).all(1).logical_not_()
    norms = torch._foreach_norm(tensors, ord=float("inf"))
    return torch.stack(norms).isfinite().logical_not_()


class SkipLog:
    """Counts masked (skipped) steps without a host read in the step that skipped.

    Each step hands its ``(n,)`` flags to :meth:`record`, which starts a non-blocking copy into
    host memory (pinned on CUDA). :meth:`poll` returns the steps whose copies have landed (on
    CUDA an event per copy says whether it has, without waiting); :meth:`flush` waits for every
    pending one (the one place that syncs: ``diagnostics()``, ``state_dict()``). On the CPU a
    copy lands at once, so a skip is reported in the step that made it.
    """

    def __init__(self) -> None:
        self.skipped = 0
        self._pending: list[tuple[Tensor, torch.cuda.Event | None, list[str]]] = []

    def record(self, flags: Tensor, names: list[str]) -> None:
        cuda = flags.device.type == "cuda"
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=cuda)
        host.copy_(flags, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((host, event, names))

    def _drain(self, wait: bool) -> list[list[str]]:
        out = []
        while self._pending:
            host, event, names = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._pending.pop(0)
            bad = [n for n, f in zip(names, host.tolist()) if f]
            if bad:
                out.append(bad)
        self.skipped += len(out)
        return out

    def poll(self) -> list[list[str]]:
        """For each skipped step whose flags have landed: the names of its non-finite tensors."""
        return self._drain(wait=False)

    def flush(self) -> list[list[str]]:
        """The same for every pending step, waiting for them (a sync on CUDA)."""
        return self._drain(wait=True)


__all__ = ["SkipLog", "Stack", "Vec", "bias_correction", "conjugate_gradient",
           "denominator_floor", "feature_statistics_", "fold_statistics_", "graft_ratio",
           "nonfinite_flags", "per_layer", "precondition_stacked", "preconditioner_terms",
           "row_norms", "stacked_dot"]
