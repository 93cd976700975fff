"""Worker for tests/test_fsdp.py: SLNB on FSDP2-sharded parameters (``fully_shard``, gloo, CPU).

``torchrun --nproc_per_node 2 tests/_fsdp_worker.py OUT PRESET[:K=V,...] MICRO [resume|resume_full]``
shards the model over two processes; ``python tests/_fsdp_worker.py OUT PRESET MICRO`` trains it
unsharded in one process on the global batch. With ``resume`` / ``resume_full`` the sharded run
checkpoints after step 3 the way Accelerate does for FSDP2 (sharded or full state dict),
rebuilds model and optimizer from scratch, loads the checkpoint and finishes.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_slnb import SLNB

STEPS, GLOBAL_BATCH, SAVE_AT = 5, 16, 3


class Net(nn.Module):
    """One layer of each kind, with row counts that do not split evenly over two ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, padding=1)
        self.emb = nn.Embedding(11, 5)
        self.lin = nn.Linear(5 * 6, 7)
        self.norm = nn.LayerNorm(7)
        self.hf = Conv1D(9, 7)  # weight (in=7, out=9): its shards split the input features
        self.wide = nn.Linear(9, 300)  # 300 > 256: a blocked gram
        self.out = nn.Linear(300, 3, bias=False)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)) + self.emb(idx)[:, :, None]
        h = self.norm(torch.tanh(self.lin(h.flatten(1))))
        return self.out(torch.tanh(self.wide(torch.tanh(self.hf(h)))))


def build(sharded: bool, preset: str) -> tuple[nn.Module, SLNB]:
    torch.manual_seed(0)
    model = Net()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for name in ("conv", "lin", "hf", "wide"):
            fully_shard(getattr(model, name))
        fully_shard(model)
    preset, _, extra = preset.partition(":")  # "whitened:direction=diag_whitened_orth"
    options = dict(kv.split("=") for kv in extra.split(",") if kv)
    options = {k: {"True": True, "False": False}.get(v, int(v) if v.isdigit() else v)
               for k, v in options.items()}
    lr = 0.3 if preset == "paper" else 1e-2
    return model, SLNB(model.parameters(), model=model, preset=preset, lr=lr, **options)


def batches(rank: int, world: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 3, 6, generator=g)
        idx = torch.randint(0, 11, (GLOBAL_BATCH,), generator=g)
        y = torch.randn(GLOBAL_BATCH, 3, generator=g)
        mine = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        yield x[mine], idx[mine], y[mine]


def train_step(model: nn.Module, opt: SLNB, batch: tuple[torch.Tensor, ...], micro: int,
               sharded: bool) -> None:
    chunks = list(zip(*(t.chunk(micro) for t in batch)))
    for i, (xc, ic, yc) in enumerate(chunks):
        if sharded:  # FSDP2's gradient accumulation: reduce-scatter on the last micro-batch
            model.set_requires_gradient_sync(i == micro - 1)  # type: ignore[operator]
        (((model(xc, ic) - yc) ** 2).mean() / micro).backward()
    opt.step()
    model.zero_grad()


def save_and_reload(model: nn.Module, opt: SLNB, out: str, preset: str, sharded: bool,
                    how: str) -> tuple[nn.Module, SLNB]:
    """Checkpoint as Accelerate does for FSDP2, rebuild everything, load the checkpoint.

    ``resume``: its default sharded state dict (``torch.distributed.checkpoint``);
    ``resume_full``: ``FULL_STATE_DICT`` (rank 0 saves, every rank loads from a broadcast).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full_dict = how == "resume_full"
    options = StateDictOptions(full_state_dict=full_dict, cpu_offload=full_dict,
                               broadcast_from_rank0=full_dict)
    saved = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt, options=options)}
    if full_dict:
        if dist.get_rank() == 0:
            torch.save(saved["optim"], f"{out}.optim.pt")
        dist.barrier()
    dcp.save(saved, checkpoint_id=f"{out}.ckpt")
    opt.remove_hooks()
    model, opt = build(sharded, preset)  # a fresh process's objects
    template = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(template, checkpoint_id=f"{out}.ckpt")
    model.load_state_dict(template["model"])
    if full_dict:
        optim = torch.load(f"{out}.optim.pt", weights_only=True) if dist.get_rank() == 0 else {}
        set_optimizer_state_dict(model, opt, optim, options=options)
    else:
        set_optimizer_state_dict(model, opt, template["optim"])
    return model, opt


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out: str, preset: str, micro: int, resume: str) -> None:
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    import hf_slnb.distributed as D

    owned, gather = [], D.gather_rows_to

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        owned.append(1)  # a layer orthogonalised on one rank (orth_split), not on every rank
        return gather(*args, **kwargs)

    D.gather_rows_to = counted
    model, opt = build(sharded, preset)
    for step, batch in enumerate(batches(rank, world), start=1):
        train_step(model, opt, batch, micro, sharded)
        if resume and step == SAVE_AT:
            model, opt = save_and_reload(model, opt, out, preset, sharded, resume)
    names = [n for n, _ in model.named_parameters()]
    params = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    state = {names[i]: {k: full(v).clone() for k, v in s.items()}
             for i, s in opt.state_dict()["state"].items()}
    torch.save({"params": params, "state": state, "owned": len(owned)}, f"{out}.rank{rank}.pt")
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "")
