"""Core v2: a step without host syncs, batched maths equal to layer-by-layer maths, and a new
direction as one class plus one registration."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import load_script
from torch import nn

from hf_slnb import SLNB
from hf_slnb.directions import DIRECTIONS, Diagonal, register_direction
from hf_slnb.functional import Stack

F64 = torch.float64


def _stack_model(seed: int = 0) -> nn.Module:
    """Three same-shape Linear layers (one bank of three) between two others."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6),
                         nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.LayerNorm(6),
                         nn.Linear(6, 2)).to(F64)


@pytest.mark.parametrize("options", [
    {},                                                     # diagonal, graft_row (default)
    {"trust_region": "graft"},
    {"trust_region": "tensor"},
    {"diagonal_only": False, "cg_iters": 3},                # PCG, graft_row
    {"preset": "paper", "trust_region": "graft_row"},
    {"preset": "whitened"},
])
def test_batched_bank_equals_one_optimizer_per_layer(options: dict) -> None:
    """The three stacked layers step as if each had its own optimizer (float64, 1e-12).

    Per-layer step rules only: each layer's update depends on that layer alone, so splitting the
    model's layers over separate optimizers (banks of one, no stacking) must not change it.
    """
    model = _stack_model()
    twin = copy.deepcopy(model)
    opt = SLNB(model.parameters(), model=model, **options)
    assert max(len(b.neurons) for b in opt.banks) == 3  # the stack is really batched
    layers = [twin[i] for i in (0, 2, 4, 6, 8, 9)]
    loops = [SLNB(m.parameters(), model=m, **options) for m in layers]
    assert all(len(b.neurons) == 1 for o in loops for b in o.banks)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(7, 5, generator=gen, dtype=F64)
        model(x).sin().sum().backward()
        twin(x).sin().sum().backward()
        opt.step()
        for o in loops:
            o.step()
        opt.zero_grad()
        for o in loops:
            o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("preset,warmup", [("graft", 2), ("paper", 2), ("whitened", 2),
                                           ("whitened", 4), ("whitened", 8)])
def test_step_hooks_and_forward_make_no_host_sync(preset: str, warmup: int) -> None:
    """0 syncs in forward, backward and step (counted by aten dispatch; a count is stable);
    for ``whitened`` (``cov_every=4``, roots every second update) in a step that reads no input
    (the third), in one that does (the fifth) and in one that also refreshes the roots (the
    ninth)."""
    bench = load_script("benchmark_step")
    row = bench.count_step("gpt2-2l", f"slnb{'-paper' if preset == 'paper' else ''}", batch=2,
                           seq=8, vocab=64, micro=2, warmup=warmup,
                           slnb_args={} if preset == "paper" else {"preset": preset})
    assert all(not row["syncs"][phase] for phase in row["syncs"]), row["sync_sites"]
    assert row["ops"]["step"] > 0


def test_nonfinite_step_is_a_mask_and_changes_nothing() -> None:
    """A NaN gradient: parameters and every state tensor bit for bit, no sync in the step."""
    model = _stack_model()
    opt = SLNB(model.parameters(), model=model)
    x = torch.randn(7, 5, dtype=F64)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    model(x).sum().backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"skipped a step: non-finite values in 2\.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    assert opt.skipped_steps == 1


class SignDiagonal(Diagonal):
    """A toy direction: the sign of SLNB's diagonal direction."""

    name = "sign_diagonal"

    def solve(self, ctx, bank, g: Stack, stats) -> Stack:  # type: ignore[override]
        return tuple(torch.sign(t) for t in super().solve(ctx, bank, g, stats))


def test_a_new_direction_is_one_class_and_one_registration() -> None:
    register_direction(SignDiagonal)
    try:
        model = _stack_model()
        opt = SLNB(model.parameters(), model=model, trust_region="graft_row")
        opt.direction = DIRECTIONS["sign_diagonal"](opt.config)
        x = torch.randn(7, 5, dtype=F64)
        w = model[2].weight
        before = w.detach().clone()
        model(x).sin().sum().backward()
        opt.step()
        delta = (w.detach() - before) / -3e-3
        # sign(P g) grafted per output row to Adam's first step, whose elements are
        # g / (|g| + eps), about +-1: every element moves by lr (weight decay aside).
        torch.testing.assert_close(delta.abs(), torch.ones_like(delta), rtol=0, atol=1e-3)
        with pytest.raises(ValueError, match="already registered"):
            register_direction(SignDiagonal)
    finally:
        DIRECTIONS.pop("sign_diagonal", None)


def test_options_doc_is_generated_from_the_one_table() -> None:
    from pathlib import Path

    from hf_slnb.config import OPTIONS, options_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "OPTIONS.md"
    assert doc.read_text() == options_markdown(), "run: python -m hf_slnb.config > docs/OPTIONS.md"
    assert all(f"``{o.name}``" in (SLNB.__doc__ or "") for o in OPTIONS)


@pytest.mark.parametrize("options,named", [
    ({"cg_iters": 4}, "cg_iters=4 (diagonal_only=True runs no conjugate gradient)"),
    ({"ridge": 0.5, "metric_backend": "explicit"}, "ridge=0.5"),
    ({"preset": "paper", "eps": 1e-6}, "eps=1e-06 (trust_region='global' has no such"),
    ({"preset": "paper", "norm_decay": 0.99}, "norm_decay=0.99"),
    ({"trust_region": "graft", "min_norm": 0.1}, "min_norm=0.1"),
])
def test_an_option_without_effect_is_warned_about(options: dict, named: str) -> None:
    m = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="these options have no effect") as caught:
        SLNB(m.parameters(), model=m, **options)
    assert any(named in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_options_that_act_are_not_warned_about() -> None:
    import warnings

    m = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SLNB(m.parameters(), model=m, preset="paper", cg_iters=4, ridge=0.5, min_norm=0.1)
        SLNB(m.parameters(), model=m, eps=1e-6, norm_decay=0.99, shrinkage=0.2)


@pytest.mark.parametrize("options", [
    {}, {"preset": "paper"}, {"trust_region": "tensor"}, {"preset": "whitened", "lr": 1e-2},
])
def test_the_step_scratch_is_released_between_steps_and_written_before_it_is_read(
        monkeypatch, options: dict) -> None:
    """Between steps an arena holds no gradient copy and no update buffer (they would cost two
    parameter-sized buffers during the forward and backward; on accelerators, and here on the
    CPU with ``RELEASE_ON_CPU``). Each step allocates them uninitialised: filled with NaN at
    every allocation, a run whose steps leave a layer out (no gradient on odd steps) and skip a
    non-finite one trains bit for bit as the plain run, which keeps them. So does a run with
    the masks of an accelerator's step on every step (``CPU_PATHS`` off: the plain run skips
    them on the steps in which every parameter is live)."""
    from hf_slnb import functional, slabs
    from hf_slnb.slabs import Arena

    def run(poison: bool, branches: bool = True) -> list[torch.Tensor]:
        monkeypatch.setattr(slabs, "RELEASE_ON_CPU", poison)
        monkeypatch.setattr(functional, "CPU_PATHS", branches)
        net = _stack_model()
        opt = SLNB(net.parameters(), model=net, **options)
        real = Arena.acquire

        def acquire(self: Arena) -> None:
            fresh = self.grad.untyped_storage().nbytes() == 0
            real(self)
            if poison and fresh:
                self.grad.fill_(float("nan"))
                self.update.fill_(float("nan"))

        monkeypatch.setattr(Arena, "acquire", acquire)
        g = torch.Generator().manual_seed(0)
        for step in range(6):
            x = torch.randn(12, 5, generator=g, dtype=F64)
            loss = net(x).pow(2).mean()
            if step == 3:
                loss = loss * float("inf")
            loss.backward()
            if step % 2:  # a layer without gradient: its rows of the scratch are never copied
                for p in net[2].parameters():
                    p.grad = None
            with pytest.warns(RuntimeWarning) if step == 3 else _no_warning():
                opt.step()
            opt.zero_grad()
            for arena in opt._arenas:
                held = 0 if poison else arena.numel * arena.grad.element_size()
                assert arena.grad.untyped_storage().nbytes() == held
                assert arena.update.untyped_storage().nbytes() == held
        return [p.detach().clone() for p in net.parameters()]

    plain, poisoned, masked = run(False), run(True), run(False, branches=False)
    assert all(torch.isfinite(p).all() for p in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, poisoned))
    assert all(torch.equal(a, b) for a, b in zip(plain, masked))


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("device", ["cpu", "meta_norm"])
def test_nonfinite_flags_are_exact(device: str, monkeypatch) -> None:
    """Each tensor is flagged iff it holds a NaN or an inf (dense: ``~isfinite(t).all()``), never
    for large finite values (a 2-norm of 3e38 overflows) nor half-precision ones near their
    limit; on the CPU (``aminmax``) and on the accelerators' path (the max-abs norm, forced here)."""
    from hf_slnb import functional

    def fp16(v: float) -> torch.Tensor:
        return torch.full((7,), v, dtype=torch.float16)

    big = torch.full((1000,), 3e38)
    big[1::2] = -3e38
    tensors = [torch.randn(5, 3), big, fp16(65504.0), torch.randn(4, dtype=F64)]
    for k, bad in enumerate((float("nan"), float("inf"), float("-inf"))):
        t = torch.randn(30, 4, dtype=(torch.float32, torch.bfloat16, F64)[k])
        t[7, 2] = bad
        tensors.append(t)
    tensors.append(torch.tensor([float("inf"), float("-inf")]))
    if device == "meta_norm":  # the accelerators' path, taken on the CPU
        monkeypatch.setattr(functional, "_on_cpu", lambda tensors: False)
    got = functional.nonfinite_flags(tensors)
    want = torch.tensor([not bool(torch.isfinite(t).all()) for t in tensors])
    assert torch.equal(got, want), (got, want)
