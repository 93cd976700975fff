#!/usr/bin/env python
"""Issue 13, round 1: candidate directions from input statistics on the GPT-2 benchmark.

A small standalone optimizer (:class:`WhitenedDirections`, a prototype, not the package): the
transformer blocks' 2-D weights get one of the directions of :mod:`hf_slnb.whitened`, built on
each layer's centred, damped input second moment ``C`` (an EMA of the full ``d_in x d_in``
matrix, collected by forward pre-hooks on training forwards; SLNB's own hooks keep only the
diagonal, so they are not reused here). Embeddings, head, biases and norms take AdamW's step at
``--aux-lr``, as Muon's authors do. Runs go through ``scripts/benchmark.py``'s ``run_one`` (same
data, model, Trainer, schedule, clipping and evals as the peers).

Usage (one training at a time, one thread)::

    OMP_NUM_THREADS=1 python scripts/research_directions.py --direction worth --lr 0.03 --seed 0
    OMP_NUM_THREADS=1 python scripts/research_directions.py --direction eigen_adam --lr 3e-3

Each run appends one JSON line (task, direction, lr, seed, evals) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

import benchmark
import torch

from hf_slnb import whitened as W

DIRECTIONS = ("worth", "worth_row", "worth_ns", "eigen_adam", "two_sided")


class WhitenedDirections(torch.optim.Optimizer):
    """Matrix group: a whitened direction; aux group: AdamW. Prototype for issue 13.

    Args:
        matrices: ``(module, weight, transposed)`` per preconditioned layer (``transposed`` for
            HF ``Conv1D``, whose weight is stored ``(in, out)``).
        aux: every other trainable parameter (AdamW).
        direction: one of ``DIRECTIONS``.
        lr: matrix lr (Muon-like for ``worth*``, Adam-like for the eigenbasis ones).
        aux_lr: AdamW's lr on ``aux``.
    """

    def __init__(self, matrices: list[tuple[torch.nn.Module, torch.nn.Parameter, bool]],
                 aux: list[torch.nn.Parameter], direction: str, lr: float, aux_lr: float,
                 weight_decay: float = 0.01, momentum: float = 0.95, beta2: float = 0.95,
                 stat_decay: float = 0.95, damping: float = 0.1, refresh: int = 10) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r}: must be one of {DIRECTIONS}.")
        self.direction, self.momentum, self.beta2 = direction, momentum, beta2
        self.stat_decay, self.damping, self.refresh = stat_decay, damping, refresh
        self.layers = {id(w): (m, t) for m, w, t in matrices}
        super().__init__([
            {"params": [w for _, w, _ in matrices], "lr": lr, "weight_decay": weight_decay,
             "matrix": True},
            {"params": aux, "lr": aux_lr, "weight_decay": 0.0, "matrix": False},
        ], {})
        self._sums: dict[int, list[Any]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(id(w))) for m, w, _ in matrices]

    def _hook(self, key: int):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = self._sums.setdefault(key, [0.0, 0.0, 0])
            s[0] = s[0] + x.sum(0)
            s[1] = s[1] + x.T @ x
            s[2] += x.shape[0]
        return hook

    def _matrix_state(self, p: torch.Tensor, g: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["m"] = torch.zeros_like(g)
            if self.direction.startswith("worth"):
                st["row_v"] = torch.zeros(g.shape[0], 1, dtype=g.dtype)
            else:
                st["v"] = torch.zeros_like(g)
            if self.direction == "two_sided":
                st["L"] = torch.zeros(g.shape[0], g.shape[0], dtype=g.dtype)
        return st

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One step: the matrix group's direction, AdamW on the rest (no closure)."""
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["matrix"]:
                    self._matrix_step(p, lr, wd)
                else:
                    self._adam_step(p, lr, wd)
        self._sums.clear()

    def _adam_step(self, p: torch.Tensor, lr: float, wd: float) -> None:
        st = self.state[p]
        if not st:
            st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        st["step"] += 1
        b1, b2, t = 0.9, 0.999, st["step"]
        st["m"].lerp_(p.grad, 1 - b1)
        st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        p.mul_(1 - lr * wd)
        denom = (st["v"] / (1 - b2**t)).sqrt_().add_(1e-8)
        p.addcdiv_(st["m"], denom, value=-lr / (1 - b1**t))

    def _matrix_step(self, p: torch.Tensor, lr: float, wd: float) -> None:
        _, transposed = self.layers[id(p)]
        g = p.grad.T if transposed else p.grad  # (d_out, d_in)
        st = self._matrix_state(p, g)
        st["step"] += 1
        t = st["step"]
        sums = self._sums.get(id(p))
        if sums is not None:  # input second moment EMA, centred
            c_b = W.centred_second_moment(sums[0], sums[1], sums[2])
            st["C"] = c_b if "C" not in st else st["C"].lerp_(c_b, 1 - self.stat_decay)
        if self.direction == "two_sided":
            st["L"].lerp_(g @ g.T, 1 - self.stat_decay)
        if "C" in st and (t - 1) % self.refresh == 0:
            c = W.damp(st["C"].double(), self.damping)
            if self.direction == "worth_ns":
                st["R"] = W.inverse_sqrt_newton_schulz(c, iters=15).float()
            else:
                root, _, q = W.inverse_root_eigh(c)
                st["R"], st["Q"] = root.float(), q.float()
            if self.direction == "two_sided":
                st["QL"] = torch.linalg.eigh(W.damp(st["L"].double(), 1e-3))[1].float()
        m = st["m"]
        if self.direction.startswith("worth"):
            m.lerp_(g, 1 - self.momentum)
            nesterov = g.lerp(m, self.momentum)
            r = st.get("R")
            if r is None:
                r = torch.eye(g.shape[1], dtype=g.dtype)
            u = W.whitened_orth(nesterov, r)
            if self.direction == "worth_row":  # NorMuon: row second-moment EMA
                st["row_v"].lerp_(u.pow(2).mean(1, keepdim=True), 1 - self.beta2)
                rv = st["row_v"] / (1 - self.beta2**t)
                u2 = u / (rv.sqrt() + 1e-8)
                u = u2 * (u.norm() / (u2.norm() + 1e-30))
            u = u * math.sqrt(max(1.0, g.shape[0] / g.shape[1]))  # Keller Jordan's factor
        else:
            m.lerp_(g, 1 - 0.9)
            q_in = st.get("Q", torch.eye(g.shape[1], dtype=g.dtype))
            q_out = st.get("QL") if self.direction == "two_sided" else None
            W.rotated_sq_update(st["v"], g, q_in, q_out, self.beta2)
            u = W.eigenbasis_adam(m, st["v"], q_in, q_out, 1 - 0.9**t, 1 - self.beta2**t)
        p.mul_(1 - lr * wd)
        p.add_(u.T if transposed else u, alpha=-lr)


def build_optimizer(model: torch.nn.Module, direction: str, lr: float, aux_lr: float,
                    prefix: str, weight_decay: float) -> WhitenedDirections:
    """Blocks' Linear / Conv1D weights to the matrix group, everything else to AdamW."""
    matrices, seen = [], set()
    for name, module in model.named_modules():
        is_conv1d = type(module).__name__ == "Conv1D"
        if name.startswith(prefix) and (isinstance(module, torch.nn.Linear) or is_conv1d):
            matrices.append((module, module.weight, is_conv1d))
            seen.add(id(module.weight))
    aux = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return WhitenedDirections(matrices, aux, direction, lr, aux_lr, weight_decay=weight_decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direction", choices=DIRECTIONS, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--aux-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/r13/research.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = benchmark.clm_task(quick=False)
    data = task.build()
    original = benchmark.trainer_kwargs

    def trainer_kwargs(opt, lr, task_, model, slnb_args):
        if opt != "research":
            return original(opt, lr, task_, model, slnb_args)
        optimizer = build_optimizer(model, args.direction, lr, args.aux_lr, task_.blocks_prefix,
                                    task_.weight_decay)
        return {}, {"optimizers": (optimizer, None)}

    benchmark.trainer_kwargs = trainer_kwargs
    result = benchmark.run_one(task, data, "research", args.lr, args.seed, None)
    row = {"direction": args.direction, **dataclasses.asdict(result)}
    print(json.dumps({"direction": args.direction, "lr": args.lr, "seed": args.seed,
                      "final": result.final_loss, "step_s": result.step_seconds}))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
