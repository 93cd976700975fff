"""SLNB's step maths batched across parameters and layers, without a host synchronisation.

Pure functions on lists of tensors (``torch._foreach_*``) or on *stacks*: tensors of shape
``(L, ...)`` holding ``L`` layers of equal shape, so that one kernel serves a whole group. They are
the GPU-shaped counterparts of the per-parameter code in :mod:`hf_slnb.optimizer`,
:mod:`hf_slnb.functional` and :mod:`hf_slnb.layers`, and equal it (``tests/test_fused.py``).

Rules that every function here keeps, so that a CUDA step never waits for the host:

- no ``.item()``, ``bool()`` or ``float()`` of a device tensor, no ``bincount``/``nonzero``;
- step counts are Python numbers (bias corrections are Python floats passed as scalar
  arguments) or device tensors (:func:`feature_statistics_`), never tensors built from Python
  numbers;
- decisions that depend on values (a layer that saw no input, a converged conjugate gradient, a
  non-finite gradient) are device masks applied with ``torch.where``, never Python branches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .functional import denominator_floor

Stack = tuple[Tensor, ...]


# -- momentum ---------------------------------------------------------------------------------
def _bias_divide(ts: list[Tensor], decays: Sequence[float], steps: Sequence[int] | Tensor
                 ) -> list[Tensor]:
    """``t / (1 - decay^step)`` for each tensor; ``steps`` Python ints or one 0-d device tensor.

    A device step count is what a masked skip needs (it must not advance on a skipped step,
    which the host does not know): the corrections are then computed on the device, one
    ``pow`` per distinct decay. Keep that counter a 0-d float64 tensor: its corrections then
    round exactly as the Python floats do, and float32 results are bit-identical to the
    Python-number path (a float32 counter differs by an ulp in about one step in six).
    """
    if not isinstance(steps, Tensor):
        return list(torch._foreach_div(ts, [1.0 - d**t for d, t in zip(decays, steps)]))
    out: list[Tensor] = list(ts)
    by_decay: dict[float, list[int]] = {}
    for i, d in enumerate(decays):
        by_decay.setdefault(d, []).append(i)
    for d, idx in by_decay.items():
        correction = torch.pow(d, steps).neg_().add_(1.0)
        for i, q in zip(idx, torch._foreach_div([ts[i] for i in idx], correction)):
            out[i] = q
    return out


def momentum_(
    bufs: list[Tensor], grads: list[Tensor], betas: Sequence[float],
    steps: Sequence[int] | Tensor,
) -> list[Tensor]:
    """Update momentum buffers in place; return the bias-corrected momenta ``g``.

    ``m <- beta m + (1 - beta) grad`` (a copy when ``beta == 0``), ``g = m / (1 - beta^t)``.

    Args:
        bufs: Momentum buffers, updated in place.
        grads: Gradients, one per buffer, already in the buffer's dtype.
        betas: Momentum ``beta`` of each buffer, in ``[0, 1)`` (Python floats).
        steps: Step count ``t >= 1`` of each buffer after this step: Python ints, or one 0-d
            device tensor shared by all (see :func:`_bias_divide`); never read on the host.

    Returns:
        The new tensors ``g``, one per buffer.
    """
    lerp = [i for i, b in enumerate(betas) if b != 0.0]
    copy = [i for i, b in enumerate(betas) if b == 0.0]
    if lerp:
        torch._foreach_lerp_([bufs[i] for i in lerp], [grads[i] for i in lerp],
                             [1.0 - betas[i] for i in lerp])
    if copy:
        torch._foreach_copy_([bufs[i] for i in copy], [grads[i] for i in copy])
    return _bias_divide(bufs, betas, steps)


# -- feature statistics and the diagonal preconditioner ---------------------------------------
def feature_statistics_(
    mu: Tensor,
    nu: Tensor,
    step: Tensor,
    sum_x: Tensor,
    sum_x2: Tensor,
    count: Tensor,
    mean_decay: float,
    sq_mean_decay: float,
    shrinkage: float,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fold one step's captures of ``L`` layers of equal feature size into their EMAs, at once.

    A layer whose ``count`` is 0 (it saw no input) keeps its EMAs and step count bit for bit
    and is reported inactive: the caller gives it the identity metric, as today's step does.

    Args:
        mu: Feature-mean EMAs ``(L, d)``, updated in place.
        nu: Feature-mean-square EMAs ``(L, d)``, updated in place.
        step: Statistics step counts ``(L, 1)`` (floating, on the device), updated in place.
        sum_x: Sums of the features over this step's input positions ``(L, d)``.
        sum_x2: Sums of their squares ``(L, d)``.
        count: Input positions ``(L, 1)``.
        mean_decay: EMA decay of ``mu``, in ``[0, 1)``.
        sq_mean_decay: EMA decay of ``nu``, in ``[0, 1)``.
        shrinkage: Share of the mean variance mixed into every variance, in ``[0, 1)``.
        has_bias: Whether the layers have a bias (group layers by it).

    Returns:
        ``(mu_hat, nu_hat, inv_denom, active)``: the bias-corrected EMAs ``(L, d)``, the
        reciprocal of the preconditioner's denominator ``(L, d)`` (see
        :func:`hf_slnb.functional.preconditioner_terms`) and the ``(L, 1)`` mask of layers that
        saw inputs. Rows of inactive layers are finite but meaningless.
    """
    active = count > 0
    safe = torch.clamp(count, min=1.0)
    step.add_(active.to(step.dtype))
    torch.where(active, torch.lerp(mu, sum_x / safe, 1.0 - mean_decay), mu, out=mu)
    torch.where(active, torch.lerp(nu, sum_x2 / safe, 1.0 - sq_mean_decay), nu, out=nu)
    t = torch.clamp(step, min=1.0).to(mu.dtype)  # an inactive layer at t = 0: any finite value
    mu_hat = mu / (1.0 - torch.pow(mean_decay, t))
    nu_hat = nu / (1.0 - torch.pow(sq_mean_decay, t))
    var = torch.clamp(nu_hat - mu_hat * mu_hat, min=0.0)
    var = (1.0 - shrinkage) * var + shrinkage * var.mean(-1, keepdim=True)
    denom = var if has_bias else var + mu_hat * mu_hat
    inv = torch.reciprocal(torch.clamp(denom, min=denominator_floor(denom.dtype)))
    return mu_hat, nu_hat, inv, active


def precondition_stacked(v: Stack, mu: Tensor, inv_denom: Tensor, feature_axis: int) -> Stack:
    """The diagonal incomplete-Cholesky preconditioner of ``L`` same-shape layers at once.

    Args:
        v: ``(W,)`` or ``(W, b)``: stacked weights ``(L, *weight_shape)`` and biases ``(L, out)``.
        mu: Bias-corrected feature means ``(L, d)``.
        inv_denom: Reciprocal preconditioner denominators ``(L, d)``.
        feature_axis: The weight's feature axis (without the stack axis): 1 for ``nn.Linear``
            ``(out, in)`` and ungrouped convolutions ``(out, in, *taps)``, 0 for Hugging Face
            ``Conv1D`` ``(in, out)`` and embeddings ``(vocab, dim)``. The output axis is the
            other of the first two.

    Returns:
        ``(W',)`` or ``(W', b')``: ``W' = (W - mu b) / denom``, ``b' = b - sum(mu W')`` with a
        bias, ``W' = W / denom`` without (``mu`` and ``denom`` broadcast over a kernel's taps).
    """
    w = v[0]
    L = w.shape[0]
    taps = w.dim() - 3
    shape = [L, 1, 1] + [1] * taps
    shape[1 + feature_axis] = -1
    inv = inv_denom.reshape(shape)
    if len(v) == 1:
        return (w * inv,)
    b = v[1]
    m = mu.reshape(shape)
    bshape = [L, 1, 1] + [1] * taps
    bshape[2 - feature_axis] = -1
    w2 = torch.addcmul(w, m, b.reshape(bshape), value=-1.0).mul_(inv)
    if taps == 0 and feature_axis == 1:  # (L, out, in) @ (L, in, 1)
        return (w2, torch.baddbmm(b[:, :, None], w2, mu[:, :, None], alpha=-1.0)[:, :, 0])
    if taps == 0:  # (L, in, out): sum over the features, axis 1
        return (w2, torch.baddbmm(b[:, None, :], mu[:, None, :], w2, alpha=-1.0)[:, 0, :])
    return (w2, b - (w2 * m).sum([2] + list(range(3, w.dim()))))


# -- conjugate gradient with device masks -----------------------------------------------------
def stacked_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Per-layer inner products ``(L,)`` of two stacked vectors (tuples of ``(L, ...)``)."""
    out = None
    for x, y in zip(a, b):
        q = torch.linalg.vecdot(x.flatten(1), y.flatten(1))
        out = q if out is None else out + q
    return out  # type: ignore[return-value]


def _per_layer(s: Tensor, t: Tensor) -> Tensor:
    return s.reshape(s.shape + (1,) * (t.dim() - 1))


def conjugate_gradient_masked(
    matvec: Callable[[Stack], Stack],
    b: Stack,
    x0: Stack | None,
    precond: Callable[[Stack], Stack],
    iters: int,
    tol: float,
) -> tuple[Stack, Tensor]:
    """PCG for ``L`` independent systems at once, stopped by device masks only.

    Each layer runs the iterations of :func:`hf_slnb.functional.conjugate_gradient`; once its
    relative residual is at most ``tol`` its ``alpha`` and ``beta`` are 0, so every further
    iteration leaves its solution and residual exactly as they are: the result equals the
    early-exiting loop's, without a host read to decide the exit.

    Args:
        matvec: ``V -> A V`` on stacked vectors (each layer its own SPD ``A``).
        b: Stacked right-hand sides, a tuple of ``(L, ...)`` tensors.
        x0: Stacked warm starts, or ``None`` for zeros.
        precond: ``R -> P R`` on stacked vectors.
        iters: Iterations (``>= 0``), all of them run.
        tol: Relative residual at which a layer stops.

    Returns:
        The stacked solutions and each layer's relative residual ``(L,)``.
    """
    bb = stacked_dot(b, b)
    if x0 is None:
        x = [torch.zeros_like(t) for t in b]
        r = [t.clone() for t in b]
    else:
        x = [t.clone() for t in x0]
        r = [bi - ai for bi, ai in zip(b, matvec(tuple(x)))]
    rr = stacked_dot(r, r)
    threshold = (tol * tol) * bb
    active = rr > threshold
    zero = torch.zeros_like(rr)
    if iters > 0:
        p = list(precond(tuple(r)))
        rz = stacked_dot(r, p)
        for i in range(iters):
            ap = matvec(tuple(p))
            alpha = torch.where(active, rz / stacked_dot(p, ap), zero)
            for xi, ri, pi, api in zip(x, r, p, ap):
                a = _per_layer(alpha, xi)
                xi.addcmul_(a, pi)
                ri.addcmul_(a, api, value=-1.0)
            rr = stacked_dot(r, r)
            active = active & (rr > threshold)
            if i == iters - 1:
                break
            z = precond(tuple(r))
            rz_new = stacked_dot(r, z)
            beta = torch.where(active, rz_new / rz, zero)
            p = [torch.addcmul(zi, _per_layer(beta, zi), pi) for zi, pi in zip(z, p)]
            rz = torch.where(active, rz_new, rz)  # a stopped layer: no 0/0 in later alphas
    rel = torch.sqrt(rr / torch.clamp(bb, min=torch.finfo(bb.dtype).tiny))
    return tuple(x), rel


# -- step rules -------------------------------------------------------------------------------
def inner_products(hs: list[Tensor], gs: list[Tensor]) -> list[Tensor]:
    """``<h_i, g_i>`` for every pair, one batched dot per group of equal numel (0-d tensors)."""
    groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    for i, h in enumerate(hs):
        groups.setdefault((h.numel(), h.dtype, h.device), []).append(i)
    out: list[Tensor] = [hs[0]] * len(hs) if hs else []
    for idx in groups.values():
        if len(idx) == 1:
            i = idx[0]
            out[i] = torch.dot(hs[i].reshape(-1), gs[i].reshape(-1))
            continue
        q = torch.linalg.vecdot(torch.stack([hs[i].reshape(-1) for i in idx]),
                                torch.stack([gs[i].reshape(-1) for i in idx]))
        for i, qi in zip(idx, q.unbind()):
            out[i] = qi
    return out


def global_radius_scales(inners: list[Tensor], lrs: Sequence[float], min_norm: float
                         ) -> tuple[list[Tensor], Tensor]:
    """The paper's trust region: ``-lr / n`` with ``n = sqrt(max(min_norm^2, sum <h, g>))``.

    Returns:
        The scales, one per parameter, and ``n``.
    """
    n = torch.sqrt(torch.clamp(torch.stack(inners).sum(), min=min_norm**2))
    inv = torch.reciprocal(n)
    return [inv * -lr for lr in lrs], n


def tensor_rms_scales_(
    metric_sq: list[Tensor], inners: list[Tensor], numels: Sequence[int], lrs: Sequence[float],
    steps: Sequence[int], decay: float, eps: float,
) -> list[Tensor]:
    """Per-tensor trust regions (Adam-mini style): ``-lr / (sqrt(EMA(<h, g> / numel)) + eps)``.

    Args:
        metric_sq: The EMAs of ``<h, g> / numel`` (0-d tensors), updated in place.
        inners: This step's ``<h, g>`` per tensor (0-d tensors).
        numels: Elements of each tensor.
        lrs: Each tensor's lr.
        steps: Each tensor's step count ``t >= 1`` (Python ints).
        decay: EMA decay (``norm_decay``).
        eps: Added to the RMS.

    Returns:
        The scales, one 0-d tensor per tensor.
    """
    q = torch._foreach_div(inners, list(map(float, numels)))
    torch._foreach_clamp_min_(q, 0.0)
    torch._foreach_lerp_(metric_sq, q, 1.0 - decay)
    rms = torch._foreach_div(metric_sq, [1.0 - decay**t for t in steps])
    torch._foreach_sqrt_(rms)
    torch._foreach_add_(rms, eps)
    torch._foreach_reciprocal_(rms)
    torch._foreach_mul_(rms, [-lr for lr in lrs])
    return list(rms)


def adam_directions_(
    exp_avg_sq: list[Tensor], grads: list[Tensor], gs: list[Tensor],
    steps: Sequence[int] | Tensor, decay: float, eps: float,
) -> list[Tensor]:
    """Adam's direction ``g / (sqrt(v / (1 - decay^t)) + eps)`` after ``v <- decay v + (1-decay) grad^2``.

    ``exp_avg_sq`` is updated in place; ``gs`` are the bias-corrected momenta.
    """
    torch._foreach_mul_(exp_avg_sq, decay)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - decay)
    den = _bias_divide(exp_avg_sq, [decay] * len(exp_avg_sq), steps)
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, eps)
    return list(torch._foreach_div(gs, den))


def graft_tensor_scales(adams: list[Tensor], hs: list[Tensor], lrs: Sequence[float]
                        ) -> list[Tensor]:
    """Adam grafting per tensor: ``-lr |adam| / |h|`` (``|h|`` floored at the dtype's tiny)."""
    if not hs:
        return []
    na = torch._foreach_norm(adams)
    nh = torch._foreach_norm(hs)
    torch._foreach_clamp_min_(nh, torch.finfo(hs[0].dtype).tiny if hs else 0.0)
    ratio = torch._foreach_div(na, nh)
    torch._foreach_mul_(ratio, [-lr for lr in lrs])
    return list(ratio)


def graft_rows_stacked(adam: Tensor, h: Tensor, row_dims: Sequence[int]) -> Tensor:
    """Adam grafting per output row of ``L`` same-shape tensors: ``h |adam_row| / |h_row|``.

    Args:
        adam: Stacked Adam directions ``(L, ...)``.
        h: Stacked SLNB directions, same shape.
        row_dims: The axes one output row spans, in the unstacked tensor (e.g. ``(1,)`` for an
            ``nn.Linear`` weight).
    """
    dims = [d + 1 for d in row_dims]
    tiny = torch.finfo(h.dtype).tiny
    ratio = torch.linalg.vector_norm(adam, dim=dims, keepdim=True) / torch.clamp(
        torch.linalg.vector_norm(h, dim=dims, keepdim=True), min=tiny)
    return h * ratio


# -- the non-finite skip as a mask ------------------------------------------------------------
def found_nonfinite(tensors: list[Tensor], one: Tensor) -> Tensor:
    """A 0-d float tensor: 1 if any element of ``tensors`` is inf or NaN, else 0.

    The check reads every element (no norm that could overflow on large finite values), on the
    device, as ``torch.amp.GradScaler`` does; ``one`` is a 0-d float32 tensor holding 1.0 on the
    tensors' device, made once outside the hot path (multiplying by it leaves them unchanged).
    """
    found = torch.zeros_like(one)
    if tensors:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    return found


def keep_where_(found: Tensor, dst: list[Tensor], new: list[Tensor]) -> None:
    """``dst <- new`` unless ``found`` (then ``dst`` stays bit for bit), with no host read."""
    skip = found > 0
    for d, n in zip(dst, new):
        torch.where(skip, d, n, out=d)


def commit_(dst: list[Tensor], new: list[Tensor], keep: Tensor) -> None:
    """``dst <- new`` where ``keep`` is 1, ``dst`` unchanged where it is 0: one foreach op.

    ``lerp`` with a 0/1 weight is exact for finite values (torch computes
    ``new - (new - dst) (1 - w)`` for ``w >= 0.5`` and ``dst + w (new - dst)`` below), so ``new``
    must be finite even on a skipped step: compute it from sanitised inputs (see
    ``scripts/count_fused_ops.py``), else use :func:`keep_where_`. Only the sign of a zero may
    change (``-0.0`` can become ``0.0``), which ``torch.equal`` does not see.

    Args:
        dst: Tensors written in place.
        new: Their new values, finite.
        keep: 0-d float tensor, 1 to write, 0 to keep (``1 - found``).
    """
    torch._foreach_lerp_(dst, new, [keep] * len(dst))


def apply_update_(params: list[Tensor], hs: list[Tensor], scales: list[Tensor],
                  decay_factors: Sequence[float], found: Tensor | None = None) -> None:
    """``p <- p * (1 - lr wd) + scale h``, skipped exactly where ``found`` is set.

    Args:
        params: Parameters (their local tensors), updated in place.
        hs: Directions.
        scales: 0-d tensors ``-lr / n`` (or the step rule's equivalent), one per parameter.
        decay_factors: ``1 - lr * weight_decay`` per parameter (Python floats).
        found: Optional 0-d non-finite flag from :func:`found_nonfinite`.
    """
    new = torch._foreach_mul(params, list(decay_factors))
    # ``_foreach_addcmul_`` takes its per-tensor values as one CPU tensor, not as device 0-d
    # tensors: multiply, then add.
    torch._foreach_add_(new, torch._foreach_mul(hs, scales))
    if found is None:
        torch._foreach_copy_(params, new)
    else:
        keep_where_(found, params, new)


class SkipLog:
    """Counts masked (skipped) steps without a host read in the step that skipped.

    :func:`found_nonfinite` leaves the skip decision on the device. Each step hands its flag to
    :meth:`record`, which starts a non-blocking copy into host memory (pinned on CUDA) and returns
    at once. :meth:`poll` (call it at the start of the next step) counts the copies that have
    landed, in order, without waiting: on CUDA an event per copy says whether it has, so a skip
    is reported one step late at the earliest, never lost. :meth:`flush` waits for every pending
    copy (the one place that syncs: ``diagnostics()``, ``state_dict()``, the end of training).
    The warning is the caller's, raised when :meth:`poll` or :meth:`flush` returns a skip.
    """

    def __init__(self) -> None:
        self.skipped = 0
        self._pending: list[tuple[Tensor, torch.cuda.Event | None]] = []

    def record(self, found: Tensor) -> None:
        """Start copying this step's 0-d flag to the host (no wait)."""
        cuda = found.device.type == "cuda"
        host = torch.empty((), dtype=found.dtype, pin_memory=cuda)
        host.copy_(found, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((host, event))

    def _drain(self, wait: bool) -> int:
        new = 0
        while self._pending:
            host, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._pending.pop(0)
            new += int(host.item() > 0)  # a host tensor: no device read
        self.skipped += new
        return new

    def poll(self) -> int:
        """Skips among the copies that have landed (counted once each), without waiting."""
        return self._drain(wait=False)

    def flush(self) -> int:
        """Skips among every pending copy, waiting for them (a sync on CUDA)."""
        return self._drain(wait=True)


# -- captures ---------------------------------------------------------------------------------
def add_moments_(sum_x: Tensor, sum_x2: Tensor, x: Tensor, ones: Tensor) -> None:
    """``sum_x += x.sum(0)``, ``sum_x2 += (x * x).sum(0)`` for rows ``x`` ``(n, d)``: three ops.

    The sum is a product with a ones vector written into ``sum_x`` (``addmv_``); the squares
    are summed as a squared column norm (``addcmul_`` of the norm with itself), a reduction
    that keeps no ``(n, d)`` temporary of squares. Both round differently from
    ``sum``/``(x * x).sum`` by a few ulps. The row count is the caller's, a Python number.

    Args:
        sum_x: Running sums ``(d,)``, updated in place.
        sum_x2: Running sums of squares ``(d,)``, updated in place.
        x: Rows ``(n, d)`` in the sums' dtype.
        ones: A ones vector of at least ``n`` elements in that dtype, made once (and grown
            when a longer input comes: outside the steady state).
    """
    sum_x.addmv_(x.T, ones[: x.shape[0]])
    norm = torch.linalg.vector_norm(x, dim=0)
    sum_x2.addcmul_(norm, norm)


def add_token_counts_(counts: Tensor, idx: Tensor, one: Tensor) -> None:
    """``counts += bincount(idx)`` without ``bincount`` (whose output size syncs on CUDA).

    ``one`` is a 0-d tensor of ``counts``' dtype holding 1, made once.
    """
    flat = idx.reshape(-1)
    counts.index_add_(0, flat, one.expand(flat.numel()))


__all__ = [
    "SkipLog",
    "adam_directions_",
    "add_moments_",
    "add_token_counts_",
    "apply_update_",
    "commit_",
    "conjugate_gradient_masked",
    "feature_statistics_",
    "found_nonfinite",
    "global_radius_scales",
    "graft_rows_stacked",
    "graft_tensor_scales",
    "inner_products",
    "keep_where_",
    "momentum_",
    "precondition_stacked",
    "stacked_dot",
    "tensor_rms_scales_",
]
