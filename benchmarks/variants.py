"""Variants of the default (`whitened`) that issue 13, rounds 18-19, tried and did not adopt,
each applied as a patch over the installed ``hf_slnb`` before a benchmark script runs, so that every
number BENCHMARKS.md quotes for them comes from one command. Not part of the package: the
patches reach into its internals and may stop applying when those change.

Usage (from the repository root)::

    python benchmarks/variants.py VARIANT[,VARIANT...] SCRIPT [SCRIPT'S ARGUMENTS...]

for example::

    python benchmarks/variants.py polar_express scripts/benchmark.py --threads 1 --tasks llama \\
        --optimizers slnb --lr slnb=1e-3 --seeds 0
    HF_HUB_OFFLINE=1 python benchmarks/variants.py damping=1000 benchmarks/arch_sweep.py \\
        --only roberta_cls,qwen2 --lrs 3e-4,1e-3,3e-3

Variants (``NAME`` or ``NAME=VALUE``):

* ``polar_express[=STEPS]``: the Newton-Schulz iteration with Polar Express's five per-step
  coefficients (Amsel et al. 2025, arXiv 2505.16932, as modded-nanogpt uses them) instead of
  Muon's one fixed triple, the input divided by 1.01 times its norm (their safety factor); in
  both of the optimizer's forms, on the whitened gradient and on the eigenvalues of its Gram
  matrix. With STEPS, that many steps (their first STEPS coefficients) instead of five.
* ``row_normalize``: each orthogonalised layer's update with its rows' RMS equalised, its
  Frobenius norm kept (a stateless NorMuon-like per-row step size).
* ``rms_size[=CAP]``: each orthogonalised layer's update rescaled to the Frobenius norm of a
  full-rank orthogonal matrix (RMS 0.2 lr whatever the rank of the whitened gradient), the
  factor capped at CAP (default none).
* ``adam_rms[=CAP]``: the orthogonalised update's RMS matched to Adam's, measured per layer:
  scaled by ``|m| / sqrt(v) / 0.2``, with ``m`` the bias-corrected momentum and ``v`` an EMA
  (0.999, bias-corrected) of the raw gradient's squared norm, the factor capped at CAP
  (default 5).
* ``damping=VALUE``: the whitening's damping (0.1 times the mean eigenvalue by default; 1000
  is nearly no whitening).
* ``whiten_power=P``: the inputs whitened by ``C^{-P/2}`` instead of ``C^{-1/2}`` (P = 1 is the
  default, 0 no whitening), by an eigendecomposition in the CPU's refresh (whose default is
  the Cholesky factor).
* ``dy_weighted``: each captured input position weighted, in the covariance, by the squared
  norm of its output gradient (the Fisher's input-side marginal), not uniformly.
* ``spread_damping[=F]`` (round 19): the whitening's ridge F (default 0.1) times ``Σλ² / Σλ``
  of the layer's covariance instead of 0.1 times its mean eigenvalue ``Σλ / d``: the same for
  a flat spectrum, about F times the largest eigenvalue for a concentrated one, so a layer
  whose inputs have one dominant direction is whitened less (a per-layer strength).
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path
from typing import Any

import torch

from hf_slnb import directions as D
from hf_slnb import hooks as H
from hf_slnb import whitened as W
from hf_slnb.layers import base as LB
from hf_slnb.layers import linear as LL

POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
SAFETY = 1.01


def _coefficients(steps: int) -> list[tuple[float, float, float]]:
    return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]


def polar_express(value: str | None) -> None:
    fixed = int(value) if value else None  # polar_express=4: four steps, not the caller's five
    if fixed is not None and fixed < 1:
        raise SystemExit(f"polar_express={value}: the number of steps must be >= 1")

    def orthogonalize(m: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                      dtype: torch.dtype | None = None, overwrite: bool = False) -> torch.Tensor:
        steps = fixed or steps
        if dtype is not None and dtype != m.dtype:
            return orthogonalize(m.to(dtype), steps, eps).to(m.dtype)
        tall = m.shape[-2] > m.shape[-1]
        x = (m.transpose(-2, -1) if tall else m).contiguous()
        x = x / (torch.linalg.matrix_norm(x, keepdim=True) * SAFETY + eps)
        batch = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:])
        for a, b, c in _coefficients(steps):
            gram = torch.bmm(x, x.transpose(-2, -1))
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.reshape(*batch, *x.shape[-2:])
        return x.transpose(-2, -1) if tall else x

    original = W.gram_ns5_factor

    def gram_factor(s: torch.Tensor, steps: int = 5,
                    spectral: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        steps = fixed or steps
        if not spectral:
            return original(s, steps, spectral)
        s = s / SAFETY**2
        lam, vec = torch.linalg.eigh(torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0))
        lam = lam.clamp_min(0)
        t = torch.ones_like(lam)
        for a, b, c in _coefficients(steps):
            x2 = t * t * lam
            t = t * (a + x2 * (b + c * x2))
        return torch.bmm(vec * t[..., None, :], vec.transpose(-2, -1)), (lam * t * t).sum(-1)

    W.orthogonalize_ns5 = orthogonalize
    W.gram_ns5_factor = gram_factor


def _wrap_orthogonalise(scale: Any) -> None:
    """``WhitenedOrth.orthogonalise``'s result passed through ``scale(self, bank, m, u)``."""
    original = D.WhitenedOrth.orthogonalise

    def orthogonalise(self: Any, bank: Any, m: torch.Tensor, rows: slice = slice(None),
                      size: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
        u = scale(self, bank, m, original(self, bank, m, rows))
        return W._sized(u, size, out)

    D.WhitenedOrth.orthogonalise = orthogonalise


def row_normalize(_: str | None) -> None:
    _wrap_orthogonalise(lambda self, bank, m, u: W.row_normalize(u))


def rms_size(value: str | None) -> None:
    cap = float(value) if value else math.inf

    def scale(self: Any, bank: Any, m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        full = math.sqrt(min(m.shape[1:]))
        factor = full / (torch.linalg.matrix_norm(u.float(), keepdim=True) + 1e-30)
        return u * factor.clamp(max=cap).to(u.dtype)

    _wrap_orthogonalise(scale)


def adam_rms(value: str | None) -> None:
    cap, beta2 = float(value) if value else 5.0, 0.999

    def scale(self: Any, bank: Any, m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g2 = torch.stack([n.weight.grad.float().pow(2).sum() if n.weight.grad is not None
                          else torch.zeros(()) for n in bank.neurons])
        if not hasattr(bank, "variant_sq_norm"):  # on the bank itself: one per bank, per run
            bank.variant_sq_norm, bank.variant_steps = torch.zeros_like(g2), 0
        bank.variant_steps = steps = bank.variant_steps + 1
        v = bank.variant_sq_norm
        v.lerp_(g2, 1 - beta2)
        ratio = torch.linalg.matrix_norm(m.float()) / ((v / (1 - beta2**steps)).sqrt() + 1e-30)
        return u * (ratio / D.RMS).clamp(max=cap).to(u.dtype)[:, None, None]

    _wrap_orthogonalise(scale)


def damping(value: str | None) -> None:
    if value is None:
        raise SystemExit("damping needs a value: damping=VALUE")
    D.WhitenedOrth.damping = float(value)


def whiten_power(value: str | None) -> None:
    if value is None:
        raise SystemExit("whiten_power needs a value: whiten_power=P")
    power = float(value) / 2

    def root(c: torch.Tensor) -> Any:  # the CPU refresh's factor, now symmetric C^{-P/2}
        return W.inverse_root_eigh(c, power)[0], torch.ones(c.shape[:-2], dtype=torch.bool, device=c.device)

    W.whitener_cholesky = root


def spread_damping(value: str | None) -> None:
    fraction = 0.1 if value is None else float(value)

    def damp_blocks(c: torch.Tensor, damping_: float, features: int) -> torch.Tensor:
        # Σλ² / Σλ over the layer's blocks: the mean eigenvalue for a flat spectrum, about the
        # largest for a concentrated one.
        squares = c.pow(2).sum((-2, -1)).sum(-1, keepdim=True)
        trace = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1).sum(-1, keepdim=True)
        ridge = fraction * squares / trace.clamp_min(torch.finfo(c.dtype).tiny)
        eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
        return c + ridge[..., None, None] * eye

    W.damp_blocks = damp_blocks


def dy_weighted(_: str | None) -> None:
    weights: dict[str, torch.Tensor | None] = {"w": None}
    pending_call = H._Pending.__call__

    def call(self: Any, grad: torch.Tensor) -> None:
        weights["w"] = grad.detach().float().pow(2).sum(-1).reshape(-1)
        try:
            pending_call(self, grad)
        finally:
            weights["w"] = None

    sampled = LB.sampled_moments

    def moments(x: torch.Tensor, d: int, rows: int, dtype: torch.dtype,
                blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, d).to(dtype)
        n, w = int(flat.shape[0]), weights["w"]
        if w is None or w.numel() != n:
            return sampled(x, d, rows, dtype, blocks)
        stride = LB.row_stride(n, rows, int(x.shape[-2]) if x.dim() > 2 else 1) \
            if 0 < rows < n else 1
        kept, w = flat[::stride], w[::stride]
        w = w / w.mean().clamp_min(1e-30)
        mean = (kept * w[:, None]).mean(0)
        kept = (kept - mean) * w.sqrt()[:, None]
        prod, tiles = LB._gram_tiles(d, blocks, dtype, x.device)
        for tile, span in tiles:
            LB.add_gram_upper(tile, kept[:, span])
            tile.addr_(mean[span], mean[span], beta=n / kept.shape[0], alpha=n)
        return prod, mean.mul_(n)

    class Unshared:  # each layer its own weights: no sharing of one input's moments
        @staticmethod
        def of(x: torch.Tensor, extra: Any, compute: Any) -> Any:
            return compute()

    H._Pending.__call__ = call
    LL.sampled_moments = moments
    LL.SHARED_GRAM = Unshared()


VARIANTS = {f.__name__: f for f in (polar_express, row_normalize, rms_size, adam_rms, damping,
                                    whiten_power, dy_weighted, spread_damping)}


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) > 1 else 2)
    for spec in sys.argv[1].split(","):
        name, _, value = spec.partition("=")
        if name not in VARIANTS:
            raise SystemExit(f"variants.py: unknown variant {name!r}; allowed: "
                             f"{', '.join(VARIANTS)}")
        VARIANTS[name](value or None)
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))  # its siblings import, as when run itself
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
