"""Slow, dense, float64 reference implementation of SLNB for the exactness tests.

Written only from ``/work/shared/ALGORITHM.md`` and ``docs/CONTRACT.md``, deliberately unlike a
fast implementation: for every neuron the Jacobian ``J`` of the layer output with respect to the
flattened parameter vector ``theta = [vec(W); b]`` is materialised as a dense matrix (by running
the layer, through ``torch.func.functional_call``, on every basis vector), the metric is the explicit matrix
``A = J^T J / N + ridge * D`` and the preconditioner is the explicit matrix
``P = L^{-T} D_var^{-1} L^{-1}`` (``L`` unit "Cholesky" factor of the diagonal approximation of the
feature second moment). Conjugate gradient then runs on plain dense vectors.

Everything internal is float64 regardless of the parameter dtype.

Inspection: after each ``step()`` the attribute ``last`` holds, per neuron (keyed by the owner
module's qualified name), the dense ``J``, ``A``, ``P``, ``g``, ``h`` and the bias-corrected
``mu``/``var`` used, plus ``last_step_norm`` (the global scalar ``n``).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

try:  # HF GPT-2 style Conv1D (weight stored (in, out))
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers missing
    HFConv1D = None  # type: ignore[assignment,misc]

F64 = torch.float64
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _kind(module: nn.Module) -> str | None:
    """Neuron kind of a module, or None when it is not a neuron type."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONVS):
        return "conv"
    if HFConv1D is not None and isinstance(module, HFConv1D):
        return "hfconv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


@dataclass
class _Neuron:
    """A layer linear in its parameters, with the inputs committed during the current step."""

    name: str
    module: nn.Module
    kind: str
    weight: nn.Parameter
    bias: nn.Parameter | None  # only when the bias is in the optimizer
    inputs: list[torch.Tensor] = field(default_factory=list)


class ReferenceSLNB(torch.optim.Optimizer):
    """Dense float64 reference SLNB (same constructor as ``hf_slnb.SLNB``, minus the backend)."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        mean_decay: float = 0.9,
        sq_mean_decay: float = 0.999,
        shrinkage: float = 0.1,
        ridge: float = 0.1,
        cg_iters: int = 2,
        min_norm: float = 1e-2,
        weight_decay: float = 1e-4,
        diagonal_only: bool = False,
        precondition_embeddings: bool = True,
        skip_modules: Iterable[str] = (),
        cg_tol: float = 1e-5,
    ) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.momentum = momentum
        self.mean_decay = mean_decay
        self.sq_mean_decay = sq_mean_decay
        self.shrinkage = shrinkage
        self.ridge = ridge
        self.cg_iters = cg_iters
        self.min_norm = min_norm
        self.diagonal_only = diagonal_only
        self.cg_tol = cg_tol
        self.last: dict[str, dict[str, torch.Tensor]] = {}
        self.last_step_norm: float | None = None
        self.last_preconditioned_fraction: float | None = None
        self.skipped_steps = 0
        self._suspended = False

        in_opt = {id(p) for g in self.param_groups for p in g["params"]}
        skips = [re.compile(s) for s in skip_modules]
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for name, mod in model.named_modules():
            kind = _kind(mod)
            if kind is None or (kind == "embedding" and not precondition_embeddings):
                continue
            if any(s.search(name) for s in skips):
                continue
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or id(w) not in in_opt:
                continue
            owners.setdefault(id(w), []).append((name, mod, kind))
        self.neurons: list[_Neuron] = []
        self._handles = []
        for cands in owners.values():
            non_emb = [c for c in cands if c[2] != "embedding"]
            name, mod, kind = (non_emb or cands)[0]
            b = getattr(mod, "bias", None)
            bias = b if isinstance(b, torch.Tensor) and id(b) in in_opt else None
            neuron = _Neuron(name, mod, kind, mod.weight, bias)
            self.neurons.append(neuron)
            self._handles.append(mod.register_forward_hook(self._make_hook(neuron)))

    # ------------------------------------------------------------------ capture
    def _make_hook(self, neuron: _Neuron) -> Callable[..., None]:
        """Forward hook: keep the input, commit it once gradient flows back through the output."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._suspended or not module.training or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = args[0].detach().clone()

            def commit(grad: torch.Tensor) -> None:
                neuron.inputs.append(x)

            output.register_hook(commit)

        return hook

    def remove_hooks(self) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _clear_inputs(self) -> None:
        for n in self.neurons:
            n.inputs.clear()

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def _feature_matrix(neuron: _Neuron, x: torch.Tensor) -> torch.Tensor:
        """Input positions as rows, input features as columns (float64)."""
        m = neuron.module
        if neuron.kind == "embedding":
            return nn.functional.one_hot(x.reshape(-1), m.num_embeddings).to(F64)
        if neuron.kind == "conv":
            spatial = len(m.kernel_size)
            cdim = 1 if x.dim() == spatial + 2 else 0
            return x.to(F64).movedim(cdim, -1).reshape(-1, x.shape[cdim])
        return x.to(F64).reshape(-1, x.shape[-1])

    @staticmethod
    def _out_features(neuron: _Neuron) -> int:
        m = neuron.module
        return {
            "linear": lambda: m.out_features,
            "conv": lambda: m.out_channels,
            "hfconv1d": lambda: m.nf,
            "embedding": lambda: m.embedding_dim,
        }[neuron.kind]()

    @staticmethod
    def weight_index_maps(neuron: _Neuron) -> tuple[torch.Tensor, torch.Tensor]:
        """For every element of the flattened weight: (input feature index, output row index)."""
        w = neuron.weight
        m = neuron.module
        if neuron.kind == "linear":
            out, inp = w.shape
            feat = torch.arange(inp).expand(out, inp)
            row = torch.arange(out)[:, None].expand(out, inp)
        elif neuron.kind == "hfconv1d":
            inp, out = w.shape
            feat = torch.arange(inp)[:, None].expand(inp, out)
            row = torch.arange(out).expand(inp, out)
        elif neuron.kind == "embedding":
            num, dim = w.shape
            feat = torch.arange(num)[:, None].expand(num, dim)
            row = torch.arange(dim).expand(num, dim)
        else:
            out, cin_g = w.shape[:2]
            out_g = out // m.groups
            grp = torch.arange(out) // out_g
            feat = (grp[:, None] * cin_g + torch.arange(cin_g)[None, :])
            feat = feat.reshape(out, cin_g, *([1] * (w.dim() - 2))).expand(w.shape)
            row = torch.arange(out).reshape(out, *([1] * (w.dim() - 1))).expand(w.shape)
        return feat.reshape(-1).clone(), row.reshape(-1).clone()

    def _jacobian(self, neuron: _Neuron, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
        """Dense Jacobian d vec(layer(x)) / d theta, theta = [vec(W); b] (b only if with_bias).

        The layer is linear in theta (an inactive bias is replaced by zeros, which does not change
        the Jacobian with respect to W), so column k is the layer's output for theta = e_k: the
        layer is run on every basis vector (vmapped).
        """
        m = neuron.module
        nw = neuron.weight.numel()
        n = nw + (neuron.bias.numel() if with_bias else 0)
        xin = x if neuron.kind == "embedding" else x.to(F64)
        has_bias = getattr(m, "bias", None) is not None

        def f(t: torch.Tensor) -> torch.Tensor:
            params = {"weight": t[:nw].reshape(neuron.weight.shape)}
            if with_bias:
                params["bias"] = t[nw:]
            elif has_bias:
                params["bias"] = torch.zeros(m.bias.shape, dtype=F64)
            return functional_call(m, params, (xin,)).reshape(-1)

        self._suspended = True
        try:
            return vmap(f)(torch.eye(n, dtype=F64)).T.contiguous()
        finally:
            self._suspended = False

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One SLNB step (ALGORITHM.md 1-5)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of: dict[int, dict] = {}
        params: list[nn.Parameter] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    group_of[id(p)] = group
                    params.append(p)

        for p in params:
            if not torch.isfinite(p.grad).all():
                self._skip(f"non-finite gradient in parameter of shape {tuple(p.shape)}")
                return loss
        for n in self.neurons:
            for x in n.inputs:
                if x.is_floating_point() and not torch.isfinite(x).all():
                    self._skip(f"non-finite input captured in module {n.name}")
                    return loss

        # 1. momentum with bias correction (per-parameter step count)
        g: dict[int, torch.Tensor] = {}
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = 0
                st["momentum_buffer"] = torch.zeros(p.shape, dtype=F64)
            st["step"] += 1
            m = st["momentum_buffer"]
            m.mul_(self.momentum).add_(p.grad.to(F64), alpha=1 - self.momentum)
            g[id(p)] = m / (1 - self.momentum ** st["step"])

        # 2./3. directions: identity metric unless a neuron handles the parameter
        h: dict[int, torch.Tensor] = {id(p): g[id(p)].clone() for p in params}
        self.last = {}
        for n in self.neurons:
            if id(n.weight) not in g or not n.inputs:
                continue
            with_bias = n.bias is not None and id(n.bias) in g
            hw, hb = self._neuron_direction(n, g, with_bias)
            h[id(n.weight)] = hw
            if with_bias:
                h[id(n.bias)] = hb

        n_pre = sum(
            n.weight.numel() + (n.bias.numel() if n.bias is not None and id(n.bias) in g else 0)
            for n in self.neurons
            if n.name in self.last
        )
        self.last_preconditioned_fraction = n_pre / max(sum(p.numel() for p in params), 1)

        # 4. global scalar
        total = sum(float((h[id(p)] * g[id(p)]).sum()) for p in params)
        n_glob = math.sqrt(max(self.min_norm**2, total))
        self.last_step_norm = n_glob

        # 5. update
        for p in params:
            grp = group_of[id(p)]
            p64 = p.detach().to(F64)
            new = p64 - grp["lr"] * (h[id(p)] / n_glob + grp["weight_decay"] * p64)
            p.copy_(new.to(p.dtype))
        self._clear_inputs()
        return loss

    def diagnostics(self) -> dict[str, float]:
        """Same keys as ``hf_slnb.SLNB.diagnostics`` except ``slnb/cg_rel_residual``."""
        nan = float("nan")
        frac = self.last_preconditioned_fraction
        return {
            "slnb/step_norm": nan if self.last_step_norm is None else self.last_step_norm,
            "slnb/preconditioned_fraction": nan if frac is None else frac,
            "slnb/skipped_steps": float(self.skipped_steps),
        }

    def _skip(self, why: str) -> None:
        warnings.warn(f"SLNB reference: step skipped, {why}", RuntimeWarning, stacklevel=3)
        self.skipped_steps += 1
        self._clear_inputs()

    def _neuron_direction(
        self, n: _Neuron, g: dict[int, torch.Tensor], with_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Statistics, explicit A and P, dense PCG for one neuron."""
        st = self.state[n.weight]
        nw = n.weight.numel()
        nout = self._out_features(n)

        # feature statistics over every input position of the step
        X = torch.cat([self._feature_matrix(n, x) for x in n.inputs], dim=0)
        mu_b = X.mean(dim=0)
        nu_b = (X * X).mean(dim=0)
        if "stat_step" not in st:
            st["stat_step"] = 0
            st["mu"] = torch.zeros_like(mu_b)
            st["nu"] = torch.zeros_like(nu_b)
        st["stat_step"] += 1
        t = st["stat_step"]
        st["mu"] = self.mean_decay * st["mu"] + (1 - self.mean_decay) * mu_b
        st["nu"] = self.sq_mean_decay * st["nu"] + (1 - self.sq_mean_decay) * nu_b
        mu = st["mu"] / (1 - self.mean_decay**t)
        nu = st["nu"] / (1 - self.sq_mean_decay**t)
        d = torch.clamp(nu - mu * mu, min=0.0)
        var = (1 - self.shrinkage) * d + self.shrinkage * d.mean()

        # explicit preconditioner P = L^{-T} Dinv L^{-1}
        floor = math.sqrt(torch.finfo(F64).tiny)
        feat, row = self.weight_index_maps(n)
        size = nw + (nout if with_bias else 0)
        Linv = torch.eye(size, dtype=F64)
        if with_bias:
            denom = torch.clamp(var[feat], min=floor)
            Linv[torch.arange(nw), nw + row] = -mu[feat]
            dinv = torch.cat([1.0 / denom, torch.ones(nout, dtype=F64)])
        else:
            denom = torch.clamp(var[feat] + mu[feat] ** 2, min=floor)
            dinv = 1.0 / denom
        P = torch.sparse.mm(Linv.to_sparse().t().coalesce(), dinv[:, None] * Linv)

        # explicit metric A = J^T J / N + ridge * D
        J = torch.cat([self._jacobian(n, x, with_bias) for x in n.inputs], dim=0)
        N = J.shape[0] // nout
        Dmask = torch.cat([torch.ones(nw, dtype=F64), torch.zeros(size - nw, dtype=F64)])
        A = J.T @ J / N + self.ridge * torch.diag(Dmask)

        gv = g[id(n.weight)].reshape(-1)
        if with_bias:
            gv = torch.cat([gv, g[id(n.bias)].reshape(-1)])

        if self.diagonal_only:
            hv = P @ gv
        else:
            h0w = self.state[n.weight].get("solution")
            h0w = torch.zeros(nw, dtype=F64) if h0w is None else h0w.reshape(-1)
            h0 = h0w
            if with_bias:
                h0b = self.state[n.bias].get("solution")
                h0b = torch.zeros(nout, dtype=F64) if h0b is None else h0b.reshape(-1)
                h0 = torch.cat([h0w, h0b])
            hv = self._pcg(A, P, gv, h0)
            self.state[n.weight]["solution"] = hv[:nw].reshape(n.weight.shape).clone()
            if with_bias:
                self.state[n.bias]["solution"] = hv[nw:].clone()

        self.last[n.name] = {
            "J": J, "A": A, "P": P, "g": gv, "h": hv, "mu": mu, "var": var, "N": torch.tensor(N)
        }
        hw = hv[:nw].reshape(n.weight.shape)
        hb = hv[nw:].reshape(n.bias.shape) if with_bias else None
        return hw, hb

    def _pcg(self, A: torch.Tensor, P: torch.Tensor, g: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """Plain preconditioned conjugate gradient on dense float64 vectors."""
        h = h0.clone()
        r = g - A @ h
        z = P @ r
        p = z.clone()
        rz = torch.dot(r, z)
        gg = torch.dot(g, g)
        for _ in range(self.cg_iters):
            if torch.dot(r, r) <= self.cg_tol**2 * gg:
                break
            Ap = A @ p
            alpha = rz / torch.dot(p, Ap)
            h = h + alpha * p
            r = r - alpha * Ap
            z = P @ r
            rz_new = torch.dot(r, z)
            p = z + (rz_new / rz) * p
            rz = rz_new
        return h
