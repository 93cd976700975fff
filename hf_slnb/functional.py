"""The maths of SLNB as plain functions on tensors.

Vectors of one neuron are tuples of tensors (its weight and, when it has one, its bias); the
functions here know nothing of modules, hooks or optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Vec = tuple[Tensor, ...]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two tuples of tensors, as one scalar tensor (no temporaries)."""
    terms = [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def shrink(d: Tensor, shrinkage: float) -> Tensor:
    """Shrink a vector of variances towards its mean: ``(1 - s) d + s mean(d)``."""
    return (1.0 - shrinkage) * d + shrinkage * d.mean()


def bias_corrected(ema: Tensor, decay: float, count: int) -> Tensor:
    """An exponential moving average divided by ``1 - decay**count`` (Adam's bias correction)."""
    return ema / (1.0 - decay**count)


def denominator_floor(dtype: torch.dtype) -> float:
    """Smallest preconditioner denominator allowed: guards a feature set that is all constant."""
    return torch.finfo(dtype).tiny ** 0.5


def preconditioner_terms(
    mu: Tensor, nu: Tensor, shrinkage: float, has_bias: bool
) -> tuple[Tensor, Tensor]:
    """The two vectors that define the diagonal incomplete-Cholesky preconditioner.

    Args:
        mu: Bias-corrected feature means, shape ``(d,)``.
        nu: Bias-corrected feature mean squares, shape ``(d,)``.
        shrinkage: Weight ``s`` in ``[0, 1)`` of the mean variance mixed into every variance.
        has_bias: Whether the neuron has a bias (its input is ``[x; 1]``).

    Returns:
        ``(mu, denom)``: with a bias the preconditioner maps a row ``(w, b)`` to
        ``w' = (w - mu b) / denom``, ``b' = b - sum(mu w')``; without one, ``w' = w / denom``.
    """
    var = shrink(torch.clamp(nu - mu * mu, min=0.0), shrinkage)
    denom = var if has_bias else var + mu * mu
    return mu, torch.clamp(denom, min=denominator_floor(denom.dtype))


def conjugate_gradient(
    matvec: Callable[[Vec], Vec],
    b: Vec,
    x0: Vec | None,
    precond: Callable[[Vec], Vec],
    iters: int,
    tol: float,
    inner: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor] = dot,
) -> tuple[Vec, Tensor]:
    """Preconditioned conjugate gradient for ``A x = b``, warm-started at ``x0``.

    Runs at most ``iters`` iterations and stops before an iteration once
    ``|r|^2 <= tol^2 |b|^2``. The stop is applied by masking, so on an accelerator no step
    waits for the host; on the CPU the loop also exits early.

    Args:
        matvec: ``v -> A v`` for a symmetric positive definite ``A``.
        b: Right-hand side.
        x0: Initial guess, or ``None`` for zeros (saves one product).
        precond: ``r -> P r`` for a symmetric positive definite ``P`` close to ``A^-1``.
        iters: Number of iterations (``>= 0``).
        tol: Relative residual at which to stop.
        inner: The inner product (default :func:`dot`; a sharded vector passes one that sums
            over its shards).

    Returns:
        The solution and the relative residual ``|r| / |b|`` it leaves (a scalar tensor).
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
    on_cpu = bb.device.type == "cpu"
    if iters > 0 and not (on_cpu and not bool(active)):
        p = list(precond(tuple(r)))
        rz = inner(r, p)
        for i in range(iters):
            ap = matvec(tuple(p))
            alpha = torch.where(active, rz / inner(p, ap), torch.zeros_like(rz))
            for xi, ri, pi, api in zip(x, r, p, ap):
                xi.addcmul_(alpha, pi)
                ri.addcmul_(alpha, api, value=-1.0)
            rr = inner(r, r)
            active = active & (rr > threshold)
            if i == iters - 1 or (on_cpu and not bool(active)):
                break
            z = precond(tuple(r))
            rz_new = inner(r, z)
            beta = torch.where(active, rz_new / rz, torch.zeros_like(rz))
            p = [torch.addcmul(zi, beta, pi) for zi, pi in zip(z, p)]
            rz = rz_new
    rel = torch.sqrt(rr / torch.clamp(bb, min=torch.finfo(bb.dtype).tiny))
    return tuple(x), rel
