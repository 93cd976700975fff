"""SLNB on an accelerator: the same numbers as on the CPU (the tests ``scripts/gpu_check.py`` runs).

Skipped where CUDA is missing. ``SLNB_TEST_DEVICE=cpu`` runs them on the CPU instead, which checks
the tests themselves on a machine without a GPU (``SLNB_TEST_DEVICE=cuda:1`` picks another GPU).
The paper preset on the device is checked against the dense float64 reference run on the CPU;
the default and whitened presets against themselves on the CPU, in float64 (reductions may be
ordered differently on the device, hence a tolerance rather than bit equality).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from reference_slnb import ReferenceSLNB
from torch import nn

DEVICE = torch.device(os.environ.get("SLNB_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs CUDA (or SLNB_TEST_DEVICE=cpu)")
F64 = torch.float64
STEPS = 4


class _Net(nn.Module):
    """Embedding, Linear with and without bias, Conv1d and LayerNorm: every neuron kind on one path."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.conv = nn.Conv1d(6, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 10)
        self.head = nn.Linear(10, 20, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(self.fc(self.norm(x))))


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 20, (4, 7), generator=gen), torch.randint(0, 20, (4, 7), generator=gen))
            for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> list[torch.Tensor]:
    """Parameters (on the CPU, float64) after each step."""
    out = []
    for ids, labels in _batches():
        opt.zero_grad(set_to_none=True)
        logits = model(ids.to(device))
        nn.functional.cross_entropy(logits.reshape(-1, 20), labels.to(device).reshape(-1)).backward()
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1).to("cpu", F64) for p in model.parameters()]))
    return out


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    cpu = _Net().to(F64).train()
    return cpu, copy.deepcopy(cpu).to(DEVICE)


def test_paper_preset_on_device_matches_dense_reference() -> None:
    from hf_slnb import SLNB

    ref_model, dev_model = _models()
    ref = _train(ref_model, ReferenceSLNB(ref_model.parameters(), model=ref_model), torch.device("cpu"))
    opt = SLNB(dev_model.parameters(), model=dev_model, preset="paper")
    got = _train(dev_model, opt, DEVICE)
    for t, (r, g) in enumerate(zip(ref, got), start=1):
        rel = float((g - r).norm() / r.norm())
        assert rel <= 1e-9, f"step {t}: relative difference {rel:.3e} from the dense reference"
    assert opt.diagnostics()["slnb/preconditioned_fraction"] > 0.9


@pytest.mark.parametrize("preset", ["graft", "paper"])
def test_preset_on_device_matches_cpu(preset: str) -> None:
    from hf_slnb import SLNB

    cpu_model, dev_model = _models()
    want = _train(cpu_model, SLNB(cpu_model.parameters(), model=cpu_model, preset=preset),
                  torch.device("cpu"))
    got = _train(dev_model, SLNB(dev_model.parameters(), model=dev_model, preset=preset), DEVICE)
    start = torch.cat([p.detach().reshape(-1).to("cpu", F64) for p in _models()[0].parameters()])
    for t, (w, g) in enumerate(zip(want, got), start=1):
        moved = float((w - start).norm())
        assert moved > 0
        assert float((g - w).norm()) <= 1e-10 * moved, f"step {t}: device and CPU disagree"


@pytest.mark.parametrize("max_block", [1024, 4])
def test_whitened_preset_on_device_matches_cpu(max_block: int) -> None:
    """``preset="whitened"`` in float64: on the device the inverse roots come from coupled
    Newton-Schulz and every layer iterates on ``M C^{-1/2}``, on the CPU from ``eigh`` and the
    Gram form where it applies. The same maths: the two agree to 1e-4 of the distance moved
    (Newton-Schulz's 20 steps reach the damped roots to about 1e-6); also with ``max_block=4``
    (``fc``'s 8 input features in two blocks). Between steps the device holds no step scratch."""
    from hf_slnb import SLNB

    cpu_model, dev_model = _models()
    kw = {"preset": "whitened", "lr": 1e-2, "whiten_every": 2, "max_block": max_block}
    ref = SLNB(cpu_model.parameters(), model=cpu_model, **kw)
    want = _train(cpu_model, ref, torch.device("cpu"))
    opt = SLNB(dev_model.parameters(), model=dev_model, **kw)
    got = _train(dev_model, opt, DEVICE)
    start = torch.cat([p.detach().reshape(-1).to("cpu", F64) for p in _models()[0].parameters()])
    for t, (w, g) in enumerate(zip(want, got), start=1):
        moved = float((w - start).norm())
        assert moved > 0
        assert float((g - w).norm()) <= 1e-4 * moved, f"step {t}: device and CPU disagree"
    fraction = opt.diagnostics()["slnb/preconditioned_fraction"]
    assert fraction == ref.diagnostics()["slnb/preconditioned_fraction"] > 0.4
    if DEVICE.type != "cpu":  # the CPU keeps it (hf_slnb.slabs.RELEASE_ON_CPU)
        assert all(a.grad.untyped_storage().nbytes() == 0 == a.update.untyped_storage().nbytes()
                   for a in opt._arenas)


def test_bf16_parameters_keep_float32_state_on_device() -> None:
    """ALGORITHM.md: statistics in float32 or the parameter's dtype, whichever is wider."""
    from hf_slnb import SLNB

    torch.manual_seed(0)
    model = _Net().to(DEVICE, torch.bfloat16).train()
    opt = SLNB(model.parameters(), model=model)
    _train(model, opt, DEVICE)
    fc = opt.state[model.fc.weight]
    for key in ("momentum_buffer", "mu", "nu"):
        assert fc[key].dtype == torch.float32, key
        assert fc[key].device.type == DEVICE.type, key
    assert model.fc.weight.dtype == torch.bfloat16
