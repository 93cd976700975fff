"""Ops and host syncs of a default-preset SLNB step composed from ``hf_slnb.fused`` (a projection).

Before the fused functions are wired into the optimizer, this composes the default preset's step
(``trust_region="graft_row"``, ``diagonal_only=True``, embeddings preconditioned, non-finite skip
as a mask) from them, on the issue-10 count models, with state kept as the fused design keeps it:
momentum and Adam second moments in one flat buffer per dtype (per-parameter views), feature
statistics and captures stacked per group of equal feature size. It counts the step with
``scripts/benchmark_step.py``'s counter and checks that its update equals today's ``SLNB``
step from the same state (float64)::

    python scripts/count_fused_ops.py            # both models
    python scripts/count_fused_ops.py --model gpt2-12l
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hf_slnb import SLNB, fused
from hf_slnb.layers import ConvNeuron, EmbeddingNeuron, LinearNeuron

HERE = Path(__file__).resolve().parent


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("benchmark_step", HERE / "benchmark_step.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class FusedGraftRow:
    """The default preset's step from ``hf_slnb.fused``, for counting (one parameter group)."""

    def __init__(self, opt: SLNB, lr: float, wd: float) -> None:
        g = opt.param_groups[0]
        self.beta, self.md, self.sd, self.s = g["momentum"], g["mean_decay"], \
            g["sq_mean_decay"], g["shrinkage"]
        self.decay, self.eps, self.lr, self.wd = opt.norm_decay, opt.eps, lr, wd
        self.params = [p for p in g["params"] if p.requires_grad]
        numel = sum(p.numel() for p in self.params)
        dtype = self.params[0].dtype
        self.m_flat = torch.zeros(numel, dtype=dtype)
        self.v_flat = torch.zeros(numel, dtype=dtype)
        self.g_flat = torch.zeros(numel, dtype=dtype)
        self.g_views = []
        self.m, self.v, off = [], [], 0
        for p in self.params:
            self.m.append(self.m_flat[off : off + p.numel()].view_as(p))
            self.v.append(self.v_flat[off : off + p.numel()].view_as(p))
            self.g_views.append(self.g_flat[off : off + p.numel()].view_as(p))
            off += p.numel()
        self.index = {id(p): i for i, p in enumerate(self.params)}
        seen: set[int] = set()
        groups: dict[tuple[Any, ...], list[Any]] = {}
        for n in opt.neurons:  # one neuron per weight (a tied head shares the embedding's)
            if id(n.weight) in seen or isinstance(n, ConvNeuron):
                continue
            seen.add(id(n.weight))
            axis = 0 if isinstance(n, EmbeddingNeuron) or (
                isinstance(n, LinearNeuron) and not n.features_last) else 1
            key = (tuple(n.weight.shape), n.bias is not None, axis)
            groups.setdefault(key, []).append(n)
        self.groups = []
        for (shape, bias, axis), ns in groups.items():
            L, d = len(ns), ns[0].num_features
            self.groups.append({
                "neurons": ns, "bias": bias, "axis": axis,
                "mu": torch.zeros(L, d, dtype=dtype), "nu": torch.zeros(L, d, dtype=dtype),
                "step": torch.zeros(L, 1, dtype=dtype),
                # captures: preallocated stacks, each layer's hook adds into its row
                "sum_x": torch.zeros(L, d, dtype=dtype), "sum_x2": torch.zeros(L, d, dtype=dtype),
                "count": torch.zeros(L, 1, dtype=dtype),
                "w": [self.index[id(n.weight)] for n in ns],
                "b": [self.index[id(n.bias)] for n in ns] if bias else [],
            })
        self.rows = {i for gr in self.groups for i in gr["w"]}
        self.one = torch.ones((), dtype=torch.float32)
        # on the device (a skipped step does not count), float64 (see fused._bias_divide)
        self.t = torch.zeros((), dtype=torch.float64)
        self.log = fused.SkipLog()

    def state(self) -> list[Tensor]:
        """Every state tensor, for comparisons."""
        return [self.m_flat, self.v_flat, self.t] + [
            gr[k] for gr in self.groups for k in ("mu", "nu", "step")]

    def load_captures(self, opt: SLNB) -> None:
        """Copy today's captures into the stacks (what the fused hooks would have written)."""
        for gr in self.groups:
            for r, n in enumerate(gr["neurons"]):
                cap = n.capture
                gr["sum_x"][r].copy_(cap.sum_x)
                gr["sum_x2"][r].copy_(cap.square_sums())
                gr["count"][r].copy_(cap.count)

    @torch.no_grad()
    def step(self) -> None:
        """One step; a non-finite gradient or capture leaves parameters and state as they were.

        The skip is a mask: the gradients are copied into one flat buffer and zeroed there when
        non-finite, so every later value is finite; the state buffers are restored from their
        pre-step copies with one ``where`` each (flat or stacked), and the parameters are
        committed by one ``lerp`` with a 0/1 weight (:func:`hf_slnb.fused.commit_`).
        """
        t, params, n = self.t, self.params, len(self.params)
        grads = [p.grad for p in params]
        caps = [x for gr in self.groups for x in (gr["sum_x"], gr["sum_x2"])]
        found = fused.found_nonfinite(grads + caps, self.one)
        self.log.record(found)
        skip = found > 0
        keep = 1.0 - found
        t.add_(keep)
        torch._foreach_copy_(self.g_views, grads)
        self.g_flat.masked_fill_(skip, 0.0)
        m_old, v_old = self.m_flat.clone(), self.v_flat.clone()
        g = fused.momentum_(self.m, self.g_views, [self.beta] * n, t)
        hs = list(g)
        for gr in self.groups:
            # a skipped step counts as no input: the EMAs and their step stay as they were
            count = gr["count"].masked_fill(skip, 0.0)
            mu, _, inv, active = fused.feature_statistics_(
                gr["mu"], gr["nu"], gr["step"], gr["sum_x"].masked_fill(skip, 0.0),
                gr["sum_x2"].masked_fill(skip, 0.0), count, self.md, self.sd, self.s,
                gr["bias"])
            idx = gr["w"] + gr["b"]
            stacked = (torch.stack([g[i] for i in gr["w"]]),) + (
                (torch.stack([g[i] for i in gr["b"]]),) if gr["bias"] else ())
            out = fused.precondition_stacked(stacked, mu, inv, gr["axis"])
            out = [torch.where(active.reshape((-1,) + (1,) * (o.dim() - 1)), o, st)
                   for o, st in zip(out, stacked)]
            for i, hh in zip(idx, [x for o in out for x in o.unbind()]):
                hs[i] = hh
            gr["h"] = out
        adam = fused.adam_directions_(self.v, self.g_views, g, t, self.decay, self.eps)
        torch.where(skip, m_old, self.m_flat, out=self.m_flat)
        torch.where(skip, v_old, self.v_flat, out=self.v_flat)
        pre = {i for gr in self.groups for i in gr["w"] + gr["b"]}
        per_tensor = sorted(pre - self.rows)
        for gr in self.groups:  # per output row, the weights of a group at once
            a = torch.stack([adam[i] for i in gr["w"]])
            rowed = fused.graft_rows_stacked(a, gr["h"][0], ((1,) if gr["axis"] == 1 else (0,)))
            for i, hh in zip(gr["w"], rowed.unbind()):
                hs[i] = hh
        scales = fused.graft_tensor_scales([adam[i] for i in per_tensor],
                                           [hs[i] for i in per_tensor], [self.lr] * len(per_tensor))
        for i in range(n):
            if i not in pre:
                hs[i] = adam[i]
        plain = [i for i in range(n) if i not in per_tensor]
        new = torch._foreach_mul(params, 1.0 - self.lr * self.wd)
        if per_tensor:
            torch._foreach_add_([new[i] for i in per_tensor],
                                torch._foreach_mul([hs[i] for i in per_tensor], scales))
        torch._foreach_add_([new[i] for i in plain], [hs[i] for i in plain], alpha=-self.lr)
        fused.commit_(params, new, keep)
        torch._foreach_zero_(caps + [gr["count"] for gr in self.groups])


class FusedPaper:
    """``preset="paper"`` (PCG, one global radius) from ``hf_slnb.fused``, for counting.

    Supports what the tiny Llama has: ``nn.Linear`` without bias (matrix-free metric, the inputs
    of a group stacked) and ``nn.Embedding`` (diagonal metric); every other parameter has the
    identity metric. No skip mask here: the default preset's class shows it.
    """

    def __init__(self, opt: SLNB) -> None:
        g = opt.param_groups[0]
        self.opt, self.beta, self.md, self.sd, self.s = opt, g["momentum"], g["mean_decay"], \
            g["sq_mean_decay"], g["shrinkage"]
        self.lr, self.wd, self.ridge, self.iters = g["lr"], g["weight_decay"], g["ridge"], \
            g["cg_iters"]
        self.params = [p for p in g["params"] if p.requires_grad]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.index = {id(p): i for i, p in enumerate(self.params)}
        groups: dict[tuple[Any, ...], list[Any]] = {}
        for n in opt.neurons:
            if n.bias is not None or not isinstance(n, (LinearNeuron, EmbeddingNeuron)) or (
                    isinstance(n, LinearNeuron) and not n.features_last):
                raise ValueError(f"FusedPaper: unsupported layer {n.name!r}")
            groups.setdefault((type(n), tuple(n.weight.shape)), []).append(n)
        dtype = self.params[0].dtype
        self.groups = [{
            "neurons": ns, "embedding": isinstance(ns[0], EmbeddingNeuron),
            "mu": torch.zeros(len(ns), ns[0].num_features, dtype=dtype),
            "nu": torch.zeros(len(ns), ns[0].num_features, dtype=dtype),
            "step": torch.zeros(len(ns), 1, dtype=dtype),
            "sol": torch.zeros((len(ns),) + tuple(ns[0].weight.shape), dtype=dtype),
            "w": [self.index[id(n.weight)] for n in ns]} for ns in groups.values()]
        self.t = 0

    @torch.no_grad()
    def step(self) -> Tensor:
        self.t += 1
        params, n = self.params, len(self.params)
        g = fused.momentum_(self.m, [p.grad for p in params], [self.beta] * n, [self.t] * n)
        hs = list(g)
        for gr in self.groups:
            caps = [nr.capture for nr in gr["neurons"]]
            sum_x = torch.stack([c.sum_x for c in caps])
            count = torch.stack([c.count for c in caps]).unsqueeze(1)
            n_out = torch.stack([c.n_out for c in caps]).reshape(-1, 1, 1)
            mu, _, inv, _ = fused.feature_statistics_(
                gr["mu"], gr["nu"], gr["step"], sum_x, torch.stack([c.square_sums() for c in caps]),
                count, self.md, self.sd, self.s, False)
            b = (torch.stack([g[i] for i in gr["w"]]),)
            axis = 0 if gr["embedding"] else 1
            if gr["embedding"]:
                diag = (sum_x.unsqueeze(2) / n_out).add_(self.ridge)

                def matvec(v: Any, diag: Tensor = diag) -> Any:
                    return (v[0] * diag,)
            else:
                xs = torch.stack([torch.cat([x.reshape(-1, x.shape[-1]) for x in c.inputs])
                                  for c in caps])

                def matvec(v: Any, xs: Tensor = xs, n_out: Tensor = n_out) -> Any:
                    y = torch.bmm(xs, v[0].transpose(1, 2))
                    return (torch.bmm(y.transpose(1, 2), xs).div_(n_out).add_(v[0],
                                                                              alpha=self.ridge),)

            def pre(v: Any, mu: Tensor = mu, inv: Tensor = inv, axis: int = axis) -> Any:
                return fused.precondition_stacked(v, mu, inv, axis)

            x0 = (gr["sol"],) if self.t > 1 else None
            sol, _ = fused.conjugate_gradient_masked(matvec, b, x0, pre, self.iters,
                                                     self.opt.cg_tol)
            gr["sol"].copy_(sol[0])
            for i, hh in zip(gr["w"], sol[0].unbind()):
                hs[i] = hh
        scales, norm = fused.global_radius_scales(fused.inner_products(hs, g), [self.lr] * n,
                                                  self.opt.min_norm)
        new = torch._foreach_mul(params, 1.0 - self.lr * self.wd)
        torch._foreach_add_(new, torch._foreach_mul(hs, scales))
        torch._foreach_copy_(params, new)
        return norm


def run_paper(steps: int) -> dict[str, Any]:
    """The paper preset on the tiny Llama: ops, syncs, and the difference to ``SLNB``."""
    bench = _bench()
    vocab, seq = 128, 16
    model = bench.build_count_model("llama-12l", seq, vocab).double().train()
    twin = copy.deepcopy(model)
    opt = SLNB(model.parameters(), model=model, preset="paper", metric_backend="matrix_free")
    ref = SLNB(twin.parameters(), model=twin, preset="paper", metric_backend="matrix_free")
    fz = FusedPaper(opt)
    gen = torch.Generator().manual_seed(1)
    counter = None
    for k in range(steps):
        x = torch.randint(0, vocab, (2, seq), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        twin(input_ids=x, labels=x).loss.backward()
        if k == steps - 1:
            with bench.OpCounter() as counter:
                fz.step()
        else:
            fz.step()
        ref.step()
        opt.clear_captures()
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(model.parameters(),
                                                              twin.parameters()))
    return {"tensors": len(fz.params), "ops": counter.device_ops("other"),  # type: ignore[union-attr]
            "views": counter.views("other"), "syncs": dict(counter.syncs["other"]),  # type: ignore[union-attr]
            "diff": diff}


def run(name: str, steps: int) -> dict[str, Any]:
    bench = _bench()
    vocab, seq = 128, 16
    model = bench.build_count_model(name, seq, vocab).double().train()
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in twin.parameters()]
    opt = SLNB(model.parameters(), model=model, lr=3e-3, weight_decay=1e-4)
    ref = SLNB(twin.parameters(), model=twin, lr=3e-3, weight_decay=1e-4)
    fz = FusedGraftRow(opt, 3e-3, 1e-4)
    gen = torch.Generator().manual_seed(1)
    counter = None
    for k in range(steps):
        x = torch.randint(0, vocab, (2, seq), generator=gen)
        torch.manual_seed(k)  # the same dropout masks in both
        model(input_ids=x, labels=x).loss.backward()
        torch.manual_seed(k)
        twin(input_ids=x, labels=x).loss.backward()
        fz.load_captures(opt)
        if k == steps - 1:
            with bench.OpCounter() as counter:
                fz.step()
        else:
            fz.step()
        ref.step()
        opt.clear_captures()
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    with torch.no_grad():
        diffs = {k: float((a - b).abs().max()) for (k, a), b in
                 zip(model.named_parameters(), twin.parameters())}
        moved = max(float((a - b).abs().max()) for a, b in zip(twin.parameters(), start))
    diff = max(diffs.values())
    worst = max(diffs, key=diffs.get)  # type: ignore[arg-type]
    n = len(fz.params)
    return {"model": name, "tensors": n, "ops": counter.device_ops("other"),  # type: ignore[union-attr]
            "views": counter.views("other"), "syncs": dict(counter.syncs["other"]),  # type: ignore[union-attr]
            "top": counter.ops["other"].most_common(8),  # type: ignore[union-attr]
            "max_abs_diff_vs_SLNB": diff, "worst": worst, "moved": moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("gpt2-12l", "llama-12l", "both"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--paper", action="store_true",
                        help="also count preset='paper' (PCG, global radius) on llama-12l")
    parser.set_defaults(model="both", steps=3)
    args = parser.parse_args()
    names = ("gpt2-12l", "llama-12l") if args.model == "both" else (args.model,)
    for name in names:
        r = run(name, args.steps)
        print(f"{r['model']}: {r['tensors']} tensors, step {r['ops']} device ops "
              f"({r['ops'] / r['tensors']:.2f} per tensor; {r['views']} of them views), "
              f"syncs {r['syncs'] or 0}, max |p_fused - p_SLNB| = {r['max_abs_diff_vs_SLNB']:.2e} "
              f"(at {r['worst']}; SLNB moved the parameters by up to {r['moved']:.2e})")
        print("  most frequent ops:", ", ".join(f"{k.split('.')[1]} {v}" for k, v in r["top"]))
    if args.paper:
        r = run_paper(args.steps)
        print(f"llama-12l preset=paper (matrix-free PCG): {r['tensors']} tensors, step "
              f"{r['ops']} device ops ({r['ops'] / r['tensors']:.2f} per tensor; {r['views']} "
              f"views), syncs {r['syncs'] or 0}, max |p_fused - p_SLNB| = {r['diff']:.2e}")


if __name__ == "__main__":
    main()
