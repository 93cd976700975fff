"""Worker for tests/test_distributed.py: SLNB under torch DDP (gloo, CPU).

Run as ``torchrun --nproc_per_node 2 tests/_ddp_worker.py OUT BACKEND MICRO`` (data parallel) or
``python tests/_ddp_worker.py OUT BACKEND MICRO`` (one process on the global batch); BACKEND
``whitened`` runs ``preset="whitened"`` instead (``whitened_blocks`` with ``max_block=16``),
and ``split`` / ``nosplit`` run it on a stack of three same-shape layers with ``orth_split`` on / off (the file then records how many
orthogonalisation all-gathers ran); ``diag_split`` / ``diag_nosplit`` the same with
``direction="diag_whitened_orth"``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from hf_slnb import SLNB

STEPS, GLOBAL_BATCH = 5, 16


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.emb = nn.Embedding(11, 4)
        self.lin = nn.Linear(4 * 6, 8)
        self.norm = nn.LayerNorm(8)
        self.wide = nn.Linear(8, 300)  # 300 > 256: its gram is reduced in upper blocks
        self.out = nn.Linear(300, 2, bias=False)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)) + self.emb(idx)[:, :, None]
        h = self.norm(torch.tanh(self.lin(h.flatten(1))))
        return self.out(torch.tanh(self.wide(h)))


class Stack(nn.Module):
    """Three same-shape hidden layers (one bank of 3: shares of 2 and 1 on two ranks) and a
    second bank of two, beside a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.norm = nn.LayerNorm(8)
        self.pair = nn.ModuleList(nn.Linear(8, 12) for _ in range(2))
        self.out = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.flatten(1)[:, :6]))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        h = self.norm(h)
        return self.out(torch.tanh(self.pair[0](h)) * torch.tanh(self.pair[1](h)))


def main(out: str, backend: str, micro: int) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    orth = backend.removeprefix("diag_") in ("split", "nosplit")
    model = Stack() if orth else Net()
    gathers = []
    if orth:
        import hf_slnb.distributed as D

        count = D.all_gather_shares

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            gathers.append(1)
            return count(*args, **kwargs)

        D.all_gather_shares = counted
        direction = "diag_whitened_orth" if backend.startswith("diag_") else "whitened_orth"
        opt = SLNB(model.parameters(), model=model, preset="whitened", lr=1e-2, whiten_every=2,
                   orth_layers="hidden", orth_split=backend.removeprefix("diag_") == "split",
                   direction=direction,  # whitened_orth: a refresh every second step
                   **({} if backend.startswith("diag_") else {"cov_every": 1}))
    elif backend == "whitened":  # the whitened preset, a refresh of its roots every second step
        opt = SLNB(model.parameters(), model=model, preset="whitened", lr=1e-2, whiten_every=2)
    elif backend == "whitened_blocks":  # its inputs whitened in blocks of at most 16 features
        opt = SLNB(model.parameters(), model=model, preset="whitened", lr=1e-2, whiten_every=2,
                   max_block=16)
    else:
        opt = SLNB(model.parameters(), model=model, metric_backend=backend, lr=0.3)
    wrapped = nn.parallel.DistributedDataParallel(model) if distributed else model
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 3, 6, generator=g)
        idx = torch.randint(0, 11, (GLOBAL_BATCH,), generator=g)
        y = torch.randn(GLOBAL_BATCH, 2, generator=g)
        local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        xs, ids, ys = x[local].chunk(micro), idx[local].chunk(micro), y[local].chunk(micro)
        for i, (xc, ic, yc) in enumerate(zip(xs, ids, ys)):
            ctx = wrapped.no_sync() if distributed and i < micro - 1 else torch.enable_grad()
            with ctx:
                (((wrapped(xc, ic) - yc) ** 2).mean() / micro).backward()
        opt.step()
        model.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save({"params": flat, "state": opt.state_dict(), "gathers": len(gathers)},
               f"{out}.rank{rank}.pt")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
