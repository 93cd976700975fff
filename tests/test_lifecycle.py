"""The life cycle of SLNB's capture hooks: ownership, freeing, copies, skipped steps, backends.

Every test compares against an independent run (bit for bit where the maths is the same) or
checks a fact that the defects of issue 11 violated (a weak reference that must die, a hook
count, a warning that must be given once).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_slnb import SLNB

DT = torch.float64


def _mlp(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.LayerNorm(width),
                         nn.Linear(width, 4)).to(DT)


def _data(step: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g, dtype=DT), torch.randn(n, 4, generator=g, dtype=DT)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _state(opt: SLNB) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _train(model: nn.Module, opt: SLNB, steps: range) -> None:
    for s in steps:
        _loss(model, *_data(s)).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------------------------
# Item 9: the auto backend accounts for the whole step's inputs
# ---------------------------------------------------------------------------------------------
def test_auto_backend_folds_many_micro_batches_into_the_explicit_moment() -> None:
    width, micro, rows = 128, 40, 16
    runs = {}
    for backend in ("auto", "explicit", "matrix_free"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).to(DT)
        opt = SLNB(model.parameters(), model=model, preset="paper", metric_backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            for _ in range(micro):
                x = torch.randn(rows, width, generator=g, dtype=DT)
                (model(x).pow(2).mean() / micro).backward()
            if backend == "auto":
                caps = [n.capture for n in opt.neurons]
                assert all(c.gram is not None for c in caps)
                assert max(len(c.inputs) for c in caps) <= 8  # bounded, not one per micro-batch
            opt.step()
            opt.zero_grad()
        runs[backend] = _flat(model)
    torch.testing.assert_close(runs["auto"], runs["explicit"], rtol=0, atol=1e-10)
    torch.testing.assert_close(runs["auto"], runs["matrix_free"], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Item 10: matrix-free is exact whatever the caller does with its tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_matrix_free_refilled_input_buffer_equals_fresh_tensors(layer: str) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        if layer == "linear":
            return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Conv1d(3, 2, 2)).to(DT)

    shape = (8, 6) if layer == "linear" else (4, 2, 7)
    runs = []
    for refill in (False, True):
        model = build()
        opt = SLNB(model.parameters(), model=model, preset="paper", metric_backend="matrix_free",
                   cg_iters=4)
        g = torch.Generator().manual_seed(2)
        buf = torch.empty(shape, dtype=DT)
        for _ in range(3):
            for _ in range(3):
                x = torch.randn(shape, generator=g, dtype=DT)
                if refill:
                    buf.copy_(x)
                    x = buf
                model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])
