"""Candidate update directions built on a layer's input statistics (issue 13, research round 1).

Pure functions on tensors, no state: the research optimizer of ``scripts/research_directions.py``
(and, later, core v2's direction classes) own the state and call these. Conventions: a weight or
gradient ``M`` is ``(d_out, d_in)`` (``y = M x``); ``C`` is the layer's ``(d_in, d_in)`` input
second moment; ``L`` an output-side ``(d_out, d_out)`` factor.

* :func:`whitened_orth`: ``orth(M C^{-1/2}) C^{-1/2}``, Muon on the network whose every layer
  first whitens its inputs (SLNB's reparameterisation view), with optional per-row step sizes.
  It takes any whitening factor ``W`` of ``C`` (``Wᵀ C W = I``) and computes ``orth(M W) Wᵀ``:
  every such ``W`` is ``C^{-1/2} R`` with ``R`` orthogonal, and Newton-Schulz commutes with
  ``R`` (``p(X R (X R)ᵀ) X R = p(X Xᵀ) X R``), so the update is the same map. The optimizer
  takes :func:`whitener_cholesky` on the CPU (a sixth of ``eigh``'s cost).
* :func:`eigenbasis_adam`: Adam in the eigenbasis of ``C`` (one-sided SOAP / EKFAC with
  activation statistics) and, given ``L``'s eigenbasis too, the two-sided form.
"""

from __future__ import annotations

import functools

import torch

#: Muon's quintic Newton-Schulz coefficients (Keller Jordan's ``zeropower_via_newtonschulz5``).
NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def centred_second_moment(x_sum: torch.Tensor, xx_sum: torch.Tensor,
                          count: float | torch.Tensor) -> torch.Tensor:
    """``E[(x - μ)(x - μ)ᵀ]`` from the sums ``Σ x`` (..., d), ``Σ x xᵀ`` (..., d, d) over ``count``
    samples (a number, or a tensor of shape ``x_sum.shape[:-1] + (1,)`` for a stack)."""
    return centre_(xx_sum.clone(), x_sum, count)


def centre_(xx_sum: torch.Tensor, x_sum: torch.Tensor,
            count: float | torch.Tensor) -> torch.Tensor:
    """In place: sums ``Σ x xᵀ`` (..., d, d) become :func:`centred_second_moment`,
    ``Σ x xᵀ / n - μ μᵀ``, given ``Σ x`` (..., d) and the counts ``n`` (a number, or shaped
    ``x_sum.shape[:-1] + (1,)``)."""
    mean = x_sum / count
    xx_sum.div_(count[..., None] if isinstance(count, torch.Tensor) else count)
    return xx_sum.sub_(mean[..., :, None] * mean[..., None, :])


def damp(c: torch.Tensor, damping: float) -> torch.Tensor:
    """``C + damping · (tr C / d) · I``: a ridge relative to the mean eigenvalue, so scale-free
    (:func:`damp_blocks` with one block)."""
    return damp_blocks(c.unsqueeze(-3), damping, c.shape[-1]).squeeze(-3)


def damp_blocks(c: torch.Tensor, damping: float, features: int) -> torch.Tensor:
    """:func:`damp` for a layer whitened in diagonal blocks, ``c`` ``(..., blocks, b, b)`` (its
    input's ``features`` split as :func:`block_shape` says, zero where the last block is
    padded): one ridge per layer, ``damping`` times the layer's mean eigenvalue (its trace over
    ``features``), on every block. With one block this is :func:`damp` exactly."""
    if damping < 0:
        raise ValueError(f"damping={damping!r}: must be >= 0.")
    trace = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1).sum(-1, keepdim=True)  # (..., 1)
    ridge = damping * trace / features
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    return c + ridge[..., None, None] * eye


def block_shape(features: int, max_block: int) -> tuple[int, int]:
    """``(blocks, width)``: ``features`` split into the fewest diagonal blocks of at most
    ``max_block`` (``0``: one block), all of one width, the last padded with zero features (so
    that the blocks of a layer, and of a bank of layers, are one batched stack)."""
    if max_block <= 0 or features <= max_block:
        return 1, features
    blocks = -(-features // max_block)
    return blocks, -(-features // blocks)


def times_blocks(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``M B`` for ``m`` ``(..., r, d)`` and the block-diagonal ``B`` whose blocks are
    ``blocks`` ``(..., k, b, b)`` (``k b >= d``: the padding beyond ``d`` is dropped); a plain
    batched product when ``blocks`` is ``(..., d, d)``. ``B``'s transpose is
    ``blocks.mT``."""
    if blocks.dim() != m.dim() + 1:
        return m @ blocks
    k, b = blocks.shape[-3], blocks.shape[-1]
    d = m.shape[-1]
    if k * b != d:
        m = torch.nn.functional.pad(m, (0, k * b - d))
    out = (m.unflatten(-1, (k, b)).transpose(-3, -2) @ blocks).transpose(-3, -2).flatten(-2)
    return out[..., :d] if k * b != d else out


def inverse_root_eigh(c: torch.Tensor, power: float = 0.5,
                      eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``C^{-power}`` of a symmetric PSD ``C`` by eigendecomposition; also returns (λ, Q).

    Eigenvalues are clamped at ``eps · max λ`` so a rank-deficient ``C`` stays finite.
    """
    eigvals, eigvecs = torch.linalg.eigh(c)
    floor = eps * eigvals.amax(-1, keepdim=True).clamp_min(torch.finfo(c.dtype).tiny)
    lam = torch.maximum(eigvals, floor)
    root = (eigvecs * lam.pow(-power)[..., None, :]) @ eigvecs.transpose(-2, -1)
    return root, eigvals, eigvecs


def whitener_cholesky(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whitening factor of the symmetric positive definite ``C`` from its Cholesky factor:
    ``W = L^{-T}`` for ``C = L Lᵀ``, upper triangular, with ``Wᵀ C W = I`` and ``W Wᵀ = C⁻¹``.
    It stands in for ``C^{-1/2}`` in :func:`whitened_orth` and :func:`whitened_orth_gram` (the
    same update: the module's docstring) at a sixth to an eighth of :func:`inverse_root_eigh`'s
    cost on the CPU (8 damped (172, 172) covariances: 1.0 ms against 8.6). Also returns the
    ``(...)`` bool mask of the matrices that were positive definite; elsewhere ``W`` is not
    meaningful (not finite, or from a partial factor) and the caller keeps another. No host
    sync (``cholesky_ex``, ``solve_triangular``)."""
    factor, info = torch.linalg.cholesky_ex(c)
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device).expand_as(c)
    w = torch.linalg.solve_triangular(factor, eye, upper=False).transpose(-2, -1)
    return w, info == 0


def inverse_sqrt_newton_schulz(c: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """``C^{-1/2}`` of a symmetric positive definite ``C`` by the coupled Newton-Schulz iteration.

    ``Y₀ = C / ‖C‖_F``, ``Z₀ = I``; ``T = (3I - Z Y) / 2``, ``Y ← Y T``, ``Z ← T Z``: ``Z`` tends
    to ``(C / ‖C‖_F)^{-1/2}`` (all eigenvalues of ``Y₀`` lie in (0, 1], where it converges).
    Convergence is slow for eigenvalues far below the largest: damp ``C`` first.
    """
    if iters < 1:
        raise ValueError(f"iters={iters!r}: must be >= 1.")
    norm = torch.linalg.matrix_norm(c, keepdim=True)
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device).expand_as(c)
    y = c / norm
    z = eye.clone()
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / norm.sqrt()


#: On a CPU that multiplies bfloat16 natively, ``orth_dtype='auto'`` iterates Newton-Schulz in
#: bfloat16 on matrices whose short side is at least this: there a batched product runs about
#: twice as fast as in float32 (whitened Newton-Schulz of 16 (128, 128) layers 9.5 ms against
#: 23, of 8 (64, 64) ones 1.0 against 1.2; below that the casts cost what it saves). On an AMX
#: CPU on elongated matrices too, where it beats float32's eigendecomposition of the Gram
#: matrix (a Xeon, two threads: 8 (1024, 256) layers 18 ms against 33, 8 (344, 128) 3.9
#: against 6.8); with AVX512-BF16 alone it did not (an EPYC, one thread: 6 (384, 1536) 249
#: ms against 170).
BF16_CPU_MIN = 128


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), where
    bfloat16 matmuls run about twice float32's speed (an AVX512-BF16 EPYC: a (24, 384, 384)
    batched product 15 ms against 36) rather than 10-60x slower (an AVX2 EPYC: a
    (16, 128, 128) product 33 ms against 1.3). Asked of torch once (its private probes;
    ``False`` where a torch lacks them)."""
    return _cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")


@functools.cache
def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles (Sapphire Rapids and later Xeons), whose bfloat16
    products outrun float32 even where an eigendecomposition competes (:data:`BF16_CPU_MIN`)."""
    return _cpu_has("_is_amx_tile_supported")


def _cpu_has(*names: str) -> bool:
    """Whether any of torch's private CPU probes ``names`` says yes (``False`` where a torch
    lacks them or one fails)."""
    probes = [getattr(torch.cpu, name, None) for name in names]
    try:
        return any(bool(probe()) for probe in probes if probe is not None)
    except (RuntimeError, AttributeError, TypeError):  # a failing probe: not known native
        return False


def ns_dtype(dtype: torch.dtype, device: torch.device | str | None = None,
             choice: str = "auto", bf16_pays: bool = False) -> torch.dtype:
    """The dtype the optimizer's Newton-Schulz orthogonalisation runs in for parameters of
    ``dtype`` on ``device`` (``orth_dtype``): float64 parameters stay float64 (exact checks);
    otherwise ``choice`` ('bfloat16', 'float32'), or with 'auto' bfloat16 on accelerators (as
    Muon: faster there, and the map only needs the singular vectors roughly). On the CPU 'auto'
    is bfloat16 too where the matrix is one on which it ``bf16_pays`` (the caller's: iterated,
    short side at least :data:`BF16_CPU_MIN`) and the CPU multiplies it natively
    (:func:`native_bf16_cpu`), else float32."""
    if dtype == torch.float64:
        return dtype
    if choice == "auto":
        if device is not None and torch.device(device).type != "cpu":
            return torch.bfloat16
        return torch.bfloat16 if bf16_pays and native_bf16_cpu() else torch.float32
    return getattr(torch, choice)


def orthogonalize_ns5(m: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                      dtype: torch.dtype | None = None, overwrite: bool = False) -> torch.Tensor:
    """Muon's quintic Newton-Schulz map: ``U p(S) Vᵀ`` for ``M / ‖M‖_F = U S Vᵀ`` (≈ ``U Vᵀ``).

    ``p`` iterates ``s ← a s + b s³ + c s⁵`` ``steps`` times, in ``dtype`` (default ``m``'s);
    the result has ``m``'s dtype. ``overwrite``: ``m`` is a temporary the caller gives away,
    normalised in place (one full-size allocation fewer).
    """
    if dtype is not None and dtype != m.dtype:
        return orthogonalize_ns5(m.to(dtype), steps, eps, overwrite=True).to(m.dtype)
    a, b, c = NS5_COEFFICIENTS
    tall = m.shape[-2] > m.shape[-1]
    x = m.transpose(-2, -1) if tall else m  # iterate on the short side: X Xᵀ is the small Gram
    norm = torch.linalg.matrix_norm(x, keepdim=True) + eps
    # A strided (transposed) stack is copied contiguous first, then divided in place: dividing
    # it into a contiguous stack reads across rows (4x slower on the CPU).
    if not x.is_contiguous():
        x, overwrite = x.contiguous(), True
    x = x.div_(norm) if overwrite else x / norm
    batch = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # (B, short, long): every product a fused batched one
    for _ in range(steps):
        gram = torch.bmm(x, x.transpose(-2, -1))
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A²
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A²) X
    x = x.reshape(*batch, *x.shape[-2:])
    return x.transpose(-2, -1) if tall else x


def row_normalize(u: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Give every row of ``u`` the same RMS, keeping ``‖u‖_F`` (per-row step sizes, NorMuon-like)."""
    row_rms = u.pow(2).mean(-1, keepdim=True).sqrt()
    total_rms = u.pow(2).mean((-2, -1), keepdim=True).sqrt()
    return u * (total_rms / (row_rms + eps))


def whitened_orth(m: torch.Tensor, w: torch.Tensor, steps: int = 5,
                  per_row: bool = False, dtype: torch.dtype | None = None, size: float = 1.0,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``orth(M C^{-1/2}) C^{-1/2}``, rescaled to ``‖orth(M C^{-1/2})‖_F`` (Muon's update size),
    computed as ``orth(M W) Wᵀ`` from a whitening factor ``w`` of ``C`` (``Wᵀ C W = I``:
    ``C^{-1/2}`` itself, or :func:`whitener_cholesky`'s; the same map, as the module's
    docstring shows), in blocks if ``w`` is ``(..., k, b, b)`` (:func:`times_blocks`).

    The rescaling makes ``lr`` mean what it means for Muon whatever the scale of the inputs;
    with ``C = I`` this is exactly Muon's direction. ``per_row`` equalises the rows' RMS last.
    With a ``dtype`` (bfloat16), the two whitening products run in it as well as the
    orthogonalisation (round 12: in float32 they took a fifth of the 10.5M GPT-2's CPU step);
    the result has ``m``'s dtype. ``size`` multiplies the result and ``out`` receives it (the
    optimizer's update buffer): one pass for the rescaling, the size and the copy.
    """
    result = m.dtype
    if dtype is not None:
        m, w = m.to(dtype), w.to(dtype)
    o = orthogonalize_ns5(times_blocks(m, w), steps, overwrite=True)
    u = times_blocks(o, w.mT)
    if per_row:
        return _sized(row_normalize(_sized_like(u, o, result)), size, out)
    return _sized_like(u, o, result, size, out)


def whitened_orth_gram(m: torch.Tensor, w: torch.Tensor,
                       c_inv: torch.Tensor | None = None, steps: int = 5,
                       eps: float = 1e-7, spectral: bool = False, size: float = 1.0,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`whitened_orth` of a stack ``(L, out, in)``, the same map in exact arithmetic, with
    Newton-Schulz run on the short side's ``(s, s)`` Gram matrix instead of on ``X = M W``
    (``w``: a whitening factor of ``C``, ``Wᵀ C W = I``, as :func:`whitened_orth` takes).

    Every iterate is ``X_k = Q_k X`` (``X`` wide) or ``X Q_k`` (tall) with ``Q_k`` a polynomial
    in ``S = X Xᵀ`` (or ``Xᵀ X``), so ``Q_{k+1} = (a I + b A + c A²) Q_k`` with ``A = Q_k S Q_k``
    (:func:`gram_ns5_factor`). The result is ``Q X Wᵀ = Q M C⁻¹`` (wide and square: ``c_inv``,
    ``C⁻¹ = W Wᵀ``, is required) or ``M W Q Wᵀ`` (tall). ``w`` and ``c_inv`` may be
    block-diagonal, ``(L, k, b, b)`` (:func:`times_blocks`). About 0.6x the cost of
    :func:`whitened_orth` when ``l >= 1.5 s``; with ``spectral`` (``Q`` from an eigendecomposition
    of ``S``: the CPU, ``s >= 192``) square layers gain too. Forming ``S`` squares ``X``'s
    condition number, so use it in float32 or float64 (relative error 1e-5 to 6e-4 in
    float32, against 2e-2 for Muon's bfloat16), not bfloat16. Where ``X`` has a null direction
    (inputs from a LayerNorm lie in a hyperplane), ``S``'s eigenvalue there is rounding,
    ``eps ‖S‖``: with ``spectral`` the direction stays right (``Q`` meets ``X``'s own, tiny
    component) and only the size ``Σ λ t(λ)²`` counts it (0.4% on a (300, 8) layer); iterated,
    ``Q`` grows about 500-fold along it and rounding leaks into the direction (20% there), so
    the optimizer iterates on ``X`` itself wherever it does not take ``spectral``. ``size`` and
    ``out`` as :func:`whitened_orth`'s.
    """
    wide = m.shape[-2] <= m.shape[-1]
    mt = m.transpose(-2, -1)
    blocked = w.dim() == 4
    x = None
    if wide:
        if c_inv is None:
            raise ValueError("whitened_orth_gram: a wide stack (out <= in) needs c_inv = C^-1.")
        k = times_blocks(m, c_inv)  # M C⁻¹ = X Wᵀ
        s = torch.bmm(k, mt)  # X Xᵀ
    elif blocked:
        x = times_blocks(m, w)
        s = torch.bmm(x.transpose(-2, -1), x)  # Xᵀ X
    else:
        s = torch.bmm(torch.bmm(w.mT, torch.bmm(mt, m)), w)  # Xᵀ X
    norm = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()[..., None, None]
    s = s / (norm + eps) ** 2  # X₀ = X / (‖X‖_F + eps), as orthogonalize_ns5
    q, o_norm_sq = gram_ns5_factor(s, steps, spectral)
    if wide:
        u = torch.bmm(q, k)
    elif x is not None:  # block-diagonal W: X Q, then Wᵀ's blocks
        u = times_blocks(torch.bmm(x, q), w.mT)
    else:
        u = torch.bmm(m, torch.bmm(torch.bmm(w, q), w.mT))
    o_norm = o_norm_sq.clamp_min(0).sqrt()[..., None, None]  # ‖X_steps‖_F
    return _times(u, o_norm / (torch.linalg.matrix_norm(u, keepdim=True) + 1e-30), size, out)


def gram_ns5_factor(s: torch.Tensor, steps: int = 5,
                    spectral: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton-Schulz on a Gram matrix: for ``S = X Xᵀ`` (``(L, s, s)``, ``‖X‖_F <= 1``) the
    polynomial ``Q`` with ``Q X`` :func:`orthogonalize_ns5`'s iterate after ``steps``, and
    ``‖Q X‖_F²``.

    Iterated, ``Q₁ = a I + b S + c S²`` (one product: ``Q₀ = I``), then ``A = Q S Q``, ``Q ←
    (a I + b A + c A²) Q``: four ``s³`` products per step. ``spectral`` takes ``S = V Λ Vᵀ``
    once instead and runs the same iteration on each eigenvalue, ``t ← t (a + b λt² + c λ²t⁴)``
    from ``t = 1``, so ``Q = V t(Λ) Vᵀ``: the same ``Q`` in exact arithmetic, for one ``eigh``
    and one product. On the CPU ``eigh`` costs about ten ``s³`` products at ``s = 256`` and five
    at ``s = 768`` (twenty at ``s = 128``, where iterating is as cheap); on accelerators it
    waits for the device (its error check), so it is for the CPU only.
    """
    a, b, c = NS5_COEFFICIENTS
    if spectral:
        # A non-finite S (a step that will be skipped) must not reach LAPACK.
        lam, vec = torch.linalg.eigh(torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0))
        lam = lam.clamp_min(0)
        t = torch.ones_like(lam)
        for _ in range(steps):
            x2 = t * t * lam  # squared singular value of the iterate
            t = t * (a + x2 * (b + c * x2))
        q = torch.bmm(vec * t[..., None, :], vec.transpose(-2, -1))
        return q, (lam * t * t).sum(-1)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    q = torch.baddbmm(torch.add(eye, s, alpha=b / a), s, s, beta=a, alpha=c) if steps else \
        eye.contiguous()  # Q₁ = a I + b S + c S²
    for _ in range(steps - 1):
        aa = torch.bmm(torch.bmm(q, s), q)  # X_k X_kᵀ (or X_kᵀ X_k)
        q = torch.baddbmm(q, torch.baddbmm(aa, aa, aa, beta=b, alpha=c), q, beta=a)
    return q, (torch.bmm(q, s) * q).sum((-2, -1))


def _sized_like(u: torch.Tensor, o: torch.Tensor, dtype: torch.dtype | None = None,
                size: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``u`` rescaled to ``o``'s Frobenius norm (per matrix) times ``size``, in ``dtype``
    (default ``u``'s): the norms are taken in it and the rescaling writes it, without a cast of
    ``u`` or ``o`` where ``dtype`` widens them (the same numbers as casting them first); into
    ``out`` if given (one pass)."""
    dtype = u.dtype if dtype is None else dtype

    def norm(t: torch.Tensor) -> torch.Tensor:
        if torch.promote_types(t.dtype, dtype) != dtype:
            t = t.to(dtype)
        return torch.linalg.matrix_norm(t, keepdim=True, dtype=dtype)

    scale = norm(o) / (norm(u) + 1e-30)
    if torch.promote_types(u.dtype, dtype) != dtype:
        u = u.to(dtype)
    return _times(u, scale, size, out)


def _times(u: torch.Tensor, scale: torch.Tensor, size: float, out: torch.Tensor | None
           ) -> torch.Tensor:
    """``u * (scale * size)`` (``scale`` a per-matrix temporary, multiplied in place: the one
    pass over ``u``), into ``out`` if given."""
    if size != 1.0:
        scale.mul_(size)
    return u * scale if out is None else torch.mul(u, scale, out=out)


def _sized(u: torch.Tensor, size: float, out: torch.Tensor | None) -> torch.Tensor:
    """``u * size`` (``u`` a temporary: in place), into ``out`` if given."""
    if out is not None:
        return torch.mul(u, size, out=out)
    return u if size == 1.0 else u.mul_(size)


def diag_whitened_orth(m: torch.Tensor, d_inv_sqrt: torch.Tensor, steps: int = 5,
                       dtype: torch.dtype | None = None, size: float = 1.0,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``orth(M D^{-1/2}) D^{-1/2}`` for a diagonal ``D`` given as ``d_inv_sqrt`` ``(..., in)``,
    rescaled to ``‖orth(M D^{-1/2})‖_F`` like :func:`whitened_orth` (which it equals for
    ``C = diag(D)``; ``size`` and ``out`` as its)."""
    s = d_inv_sqrt.unsqueeze(-2)
    o = orthogonalize_ns5(m * s, steps, dtype=dtype)
    return _sized_like(o * s, o, size=size, out=out)


def rotate(g: torch.Tensor, q_in: torch.Tensor, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """``Q_outᵀ G Q_in`` (``Q_out = I`` when None): coordinates in the factors' eigenbases."""
    g = g @ q_in
    return g if q_out is None else q_out.transpose(-2, -1) @ g


def unrotate(u: torch.Tensor, q_in: torch.Tensor,
             q_out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``Q_out U Q_inᵀ``."""
    u = u @ q_in.transpose(-2, -1)
    return u if q_out is None else q_out @ u


def eigenbasis_adam(exp_avg: torch.Tensor, exp_avg_sq_rot: torch.Tensor, q_in: torch.Tensor,
                    q_out: torch.Tensor | None = None, bias_correction1: float = 1.0,
                    bias_correction2: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """Adam's direction in the eigenbasis of ``C`` (and of ``L`` when ``q_out`` is given).

    ``Q_out [ (Q_outᵀ m Q_in / bc1) / (sqrt(v / bc2) + eps) ] Q_inᵀ`` with ``m`` the first moment
    in the original coordinates and ``v`` the second moment of the *rotated* gradients
    (:func:`rotated_sq_update`), as SOAP keeps them.
    """
    m_rot = rotate(exp_avg, q_in, q_out) / bias_correction1
    return unrotate(m_rot / ((exp_avg_sq_rot / bias_correction2).sqrt() + eps), q_in, q_out)


def rotated_sq_update(exp_avg_sq_rot: torch.Tensor, grad: torch.Tensor, q_in: torch.Tensor,
                      q_out: torch.Tensor | None, beta2: float) -> torch.Tensor:
    """In place: ``v ← β₂ v + (1 - β₂) (Q_outᵀ G Q_in)²``; returns ``v``."""
    g_rot = rotate(grad, q_in, q_out)
    return exp_avg_sq_rot.mul_(beta2).addcmul_(g_rot, g_rot, value=1.0 - beta2)
