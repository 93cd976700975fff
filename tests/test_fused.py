"""The batched, sync-free maths of ``hf_slnb.fused`` equals today's per-parameter code.

Every function is checked in float64 against the per-parameter path it replaces (today's
``functional``/``layers`` functions called layer by layer, or the step's loops re-derived line for
line), against dense linear algebra where one exists, and counted: no host sync.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import load_script
from torch import nn

from hf_slnb import fused
from hf_slnb.functional import bias_corrected, conjugate_gradient, preconditioner_terms
from hf_slnb.layers import Conv1DNeuron, ConvNeuron, EmbeddingNeuron, LinearNeuron

F64 = torch.float64


def _bench() -> Any:
    return load_script("benchmark_step")


@pytest.fixture(autouse=True)
def _default_float32():
    """Other modules set float64 as the default dtype; these tests name their dtypes."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(dtype)


def _syncs(fn: Any, *args: Any) -> dict[str, int]:
    """Host syncs that ``fn(*args)`` would cost on CUDA, by kind (the benchmark's counter)."""
    counter = _bench().count_ops_in(fn, *args)
    return dict(counter.syncs["other"])


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- momentum ---------------------------------------------------------------------------------
def test_momentum_equals_the_loop_bit_for_bit() -> None:
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 2), (4, 4)]
    betas, steps = [0.9, 0.0, 0.5, 0.9], [1, 3, 7, 2]
    bufs = [torch.randn(s, dtype=F64) for s in shapes]
    grads = [torch.randn(s, dtype=F64) for s in shapes]
    ref_bufs = [b.clone() for b in bufs]
    ref = []
    for m, g, beta, t in zip(ref_bufs, grads, betas, steps):  # SLNB._momentum, line for line
        if beta == 0.0:
            m.copy_(g)
        else:
            m.lerp_(g, 1.0 - beta)
        ref.append(m / (1.0 - beta**t))
    out = fused.momentum_(bufs, grads, betas, steps)
    for a, b in zip(bufs + out, ref_bufs + ref):
        assert torch.equal(a, b)
    assert _syncs(fused.momentum_, [b.clone() for b in bufs], grads, betas, steps) == {}
    # a device step count (what a masked skip needs), shared by all: the same corrections
    again = [b.clone() for b in ref_bufs]
    on_device = fused.momentum_(again, grads, betas, torch.tensor(4.0, dtype=F64))
    for a, m, beta in zip(on_device, again, betas):
        _close(a, m / (1.0 - beta**4))


def test_device_step_count_is_bit_identical_to_python_steps_in_float32() -> None:
    """A 0-d float64 step counter gives float32 bias corrections exactly as Python floats do."""
    torch.manual_seed(17)
    for t in range(1, 200):
        m, g = torch.randn(64), torch.randn(64)
        a = fused.momentum_([m.clone()], [g], [0.9], [t])[0]
        b = fused.momentum_([m.clone()], [g], [0.9], torch.tensor(float(t), dtype=F64))[0]
        assert b.dtype == torch.float32 and torch.equal(a, b), t
        v = [torch.rand(64)]
        a = fused.adam_directions_([v[0].clone()], [g], [g], [t], 0.999, 1e-8)[0]
        b = fused.adam_directions_([v[0].clone()], [g], [g], torch.tensor(float(t), dtype=F64),
                                   0.999, 1e-8)[0]
        assert torch.equal(a, b), t


# -- feature statistics -----------------------------------------------------------------------
@pytest.mark.parametrize("has_bias", [True, False])
def test_feature_statistics_equal_the_per_layer_path(has_bias: bool) -> None:
    torch.manual_seed(1)
    L, d = 4, 6
    mu, nu = torch.randn(L, d, dtype=F64) * 0.1, torch.rand(L, d, dtype=F64)
    step = torch.tensor([[3.0], [0.0], [5.0], [1.0]], dtype=F64)
    x = [torch.randn(n, d, dtype=F64) * (i + 1) + i for i, n in enumerate((7, 0, 3, 9))]
    sum_x = torch.stack([xi.sum(0) for xi in x])
    sum_x2 = torch.stack([(xi * xi).sum(0) for xi in x])
    count = torch.tensor([[float(xi.shape[0])] for xi in x], dtype=F64)
    md, sd, s = 0.9, 0.999, 0.1
    new = [t.clone() for t in (mu, nu, step)]
    mu_hat, nu_hat, inv, active = fused.feature_statistics_(
        *new, sum_x, sum_x2, count, md, sd, s, has_bias)
    assert active[:, 0].tolist() == [True, False, True, True]
    for i in range(L):
        if i == 1:  # saw no input: everything untouched, bit for bit
            assert torch.equal(new[0][i], mu[i]) and torch.equal(new[1][i], nu[i])
            assert new[2][i].item() == 0.0
            continue
        # SLNB._update_statistics, one layer at a time
        m, v = mu[i].clone(), nu[i].clone()
        t = int(step[i].item()) + 1
        m.lerp_(sum_x[i] / count[i], 1.0 - md)
        v.lerp_(sum_x2[i] / count[i], 1.0 - sd)
        nu_ref = bias_corrected(v, sd, t)
        mu_ref, denom = preconditioner_terms(bias_corrected(m, md, t), nu_ref, s, has_bias)
        assert torch.equal(new[0][i], m) and torch.equal(new[1][i], v)
        assert new[2][i].item() == t
        _close(mu_hat[i], mu_ref)
        _close(nu_hat[i], nu_ref)
        _close(inv[i], torch.reciprocal(denom))
    args = (*[t.clone() for t in (mu, nu, step)], sum_x, sum_x2, count, md, sd, s, has_bias)
    assert _syncs(fused.feature_statistics_, *args) == {}


# -- the diagonal preconditioner on stacked layers --------------------------------------------
def _layers(kind: str, bias: bool) -> list[nn.Module]:
    torch.manual_seed(2)
    make = {
        "linear": lambda: nn.Linear(5, 3, bias=bias),
        "conv2d": lambda: nn.Conv2d(4, 3, (2, 3), bias=bias),
        "embedding": lambda: nn.Embedding(7, 3),
    }
    if kind == "conv1d_hf":
        from transformers.pytorch_utils import Conv1D

        return [Conv1D(3, 5).double() for _ in range(3)]
    return [make[kind]().double() for _ in range(3)]


@pytest.mark.parametrize(("kind", "bias"), [
    ("linear", True), ("linear", False), ("conv1d_hf", True), ("conv2d", True),
    ("conv2d", False), ("embedding", False)])
def test_precondition_stacked_equals_each_layers_helper(kind: str, bias: bool) -> None:
    if kind == "conv1d_hf":
        pytest.importorskip("transformers")
    helper = {"linear": LinearNeuron, "conv1d_hf": Conv1DNeuron, "conv2d": ConvNeuron,
              "embedding": EmbeddingNeuron}[kind]
    mods = _layers(kind, bias)
    neurons = [helper("m", m, m.weight, getattr(m, "bias", None) if bias else None, "auto")
               for m in mods]
    d = neurons[0].num_features
    torch.manual_seed(3)
    mu = torch.randn(3, d, dtype=F64)
    inv = torch.rand(3, d, dtype=F64) + 0.5
    vs = [tuple(torch.randn_like(p) for p in ((n.weight,) if n.bias is None
                                              else (n.weight, n.bias))) for n in neurons]
    stacked = tuple(torch.stack(parts) for parts in zip(*vs))
    axis = 0 if kind in ("conv1d_hf", "embedding") else 1
    out = fused.precondition_stacked(stacked, mu, inv, axis)
    for i, (n, v) in enumerate(zip(neurons, vs)):
        for got, want in zip(out, n.precondition(v, mu[i], inv[i])):
            _close(got[i], want)
    assert _syncs(fused.precondition_stacked, stacked, mu, inv, axis) == {}


# -- conjugate gradient with masks ------------------------------------------------------------
def _systems(L: int, out: int, d: int) -> tuple[torch.Tensor, Any, Any]:
    """``L`` Linear layers with a bias: dense metrics ``M_l`` over rows ``[w, b]``."""
    torch.manual_seed(4)
    ms = []
    for _ in range(L):
        x = torch.cat([torch.randn(20, d, dtype=F64), torch.ones(20, 1, dtype=F64)], 1)
        m = x.T @ x / 20
        m[:d, :d] += 0.1 * torch.eye(d, dtype=F64)
        ms.append(m)
    M = torch.stack(ms)

    def matvec(v: Any) -> Any:
        rows = torch.cat([v[0], v[1][..., None]], -1) @ M
        return (rows[..., :d], rows[..., d])

    def one(i: int) -> Any:
        def mv(v: Any) -> Any:
            rows = torch.cat([v[0], v[1][:, None]], -1) @ M[i]
            return (rows[:, :d], rows[:, d])
        return mv

    return M, matvec, one


def _jacobi(M: torch.Tensor, d: int) -> tuple[Any, Any]:
    diag = torch.diagonal(M, dim1=-2, dim2=-1)

    def pre(v: Any) -> Any:
        return (v[0] / diag[:, None, :d], v[1] / diag[:, None, d])

    def pre_one(i: int) -> Any:
        return lambda v: (v[0] / diag[i, :d], v[1] / diag[i, d])

    return pre, pre_one


def test_masked_pcg_equals_the_early_exiting_loop_and_the_dense_solve() -> None:
    L, out, d = 3, 2, 3
    M, matvec, one = _systems(L, out, d)
    pre, pre_one = _jacobi(M, d)
    torch.manual_seed(5)
    b = (torch.randn(L, out, d, dtype=F64), torch.randn(L, out, dtype=F64))
    exact = torch.linalg.solve(M[:, None], torch.cat([b[0], b[1][..., None]], -1)[..., None])
    exact = exact[..., 0]
    # layer 0 starts at its solution (today's CPU loop exits before the first iteration), layer 1
    # at zero, layer 2 near its solution (it stops after one or two iterations)
    x0 = (torch.zeros_like(b[0]), torch.zeros_like(b[1]))
    x0[0][0], x0[1][0] = exact[0, :, :d], exact[0, :, d]
    x0[0][2], x0[1][2] = exact[2, :, :d] * 1.001, exact[2, :, d] * 1.001
    for iters, tol in ((2, 1e-5), (12, 1e-9), (12, 1e-3)):
        sol, rel = fused.conjugate_gradient_masked(matvec, b, x0, pre, iters, tol)
        for i in range(L):
            want, want_rel = conjugate_gradient(
                one(i), (b[0][i], b[1][i]), (x0[0][i], x0[1][i]), pre_one(i), iters, tol)
            _close(sol[0][i], want[0])
            _close(sol[1][i], want[1])
            _close(rel[i], want_rel)
        assert torch.equal(sol[0][0], x0[0][0]) and torch.equal(sol[1][0], x0[1][0])
        if tol == 1e-9:  # converged: the dense solution
            torch.testing.assert_close(torch.cat([sol[0], sol[1][..., None]], -1), exact,
                                       rtol=1e-7, atol=1e-8)
    # the mask matters: without it layer 2 would keep iterating
    free, _ = fused.conjugate_gradient_masked(matvec, b, x0, pre, 12, 0.0)
    stopped, _ = fused.conjugate_gradient_masked(matvec, b, x0, pre, 12, 1e-3)
    assert not torch.equal(free[0][2], stopped[0][2])
    assert _syncs(fused.conjugate_gradient_masked, matvec, b, x0, pre, 4, 1e-5) == {}


# -- step rules -------------------------------------------------------------------------------
def _tensors(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(s, dtype=F64) for s in ((3, 4), (4, 3), (3, 4), (5,), (5,), (2, 2, 2))]


def test_inner_products_and_global_radius() -> None:
    hs, gs = _tensors(6), _tensors(7)
    inners = fused.inner_products(hs, gs)
    for q, h, g in zip(inners, hs, gs):
        _close(q, torch.dot(h.reshape(-1), g.reshape(-1)))
    lrs = [0.1, 0.1, 0.2, 0.3, 0.1, 0.5]
    scales, n = fused.global_radius_scales(inners, lrs, 1e-2)
    total = sum(float(torch.dot(h.reshape(-1), g.reshape(-1))) for h, g in zip(hs, gs))
    want_n = max(1e-2**2, total) ** 0.5
    _close(n, torch.tensor(want_n, dtype=F64))
    for sc, lr in zip(scales, lrs):
        _close(sc, torch.tensor(-lr / want_n, dtype=F64))
    # the floor: a direction with a negative or tiny inner product
    _, n_floor = fused.global_radius_scales([torch.tensor(-5.0, dtype=F64)], [0.1], 1e-2)
    assert n_floor.item() == pytest.approx(1e-2, rel=1e-15)
    assert _syncs(fused.inner_products, hs, gs) == {}
    assert _syncs(fused.global_radius_scales, inners, lrs, 1e-2) == {}


def test_tensor_rms_scales_equal_the_loop() -> None:
    hs, gs = _tensors(8), _tensors(9)
    inners = [torch.dot(h.reshape(-1), g.reshape(-1)) for h, g in zip(hs, gs)]
    numels = [h.numel() for h in hs]
    lrs, steps, decay, eps = [1e-3] * 3 + [2e-3] * 3, [1, 2, 3, 4, 5, 6], 0.99, 1e-8
    sq = [torch.rand((), dtype=F64) for _ in hs]
    ref_sq = [s.clone() for s in sq]
    ref = []
    for s, q, numel, lr, t in zip(ref_sq, inners, numels, lrs, steps):  # SLNB._tensor_scales
        s.lerp_(torch.clamp(q / numel, min=0.0), 1.0 - decay)
        ref.append(-lr / (torch.sqrt(s / (1.0 - decay**t)) + eps))
    out = fused.tensor_rms_scales_(sq, inners, numels, lrs, steps, decay, eps)
    for a, b in zip(sq + out, ref_sq + ref):
        _close(a, b)
    assert _syncs(fused.tensor_rms_scales_, [s.clone() for s in sq], inners, numels, lrs,
                  steps, decay, eps) == {}


def test_graft_per_tensor_and_per_row_equal_the_loop() -> None:
    grads, gs, hs = _tensors(10), _tensors(11), _tensors(12)
    steps, decay, eps, lrs = [1, 3, 3, 2, 9, 4], 0.999, 1e-8, [3e-3] * 6
    v = [torch.rand_like(g) for g in grads]
    ref_v = [t.clone() for t in v]
    ref_adam = []
    for vi, grad, g, t in zip(ref_v, grads, gs, steps):  # SLNB._graft, line for line
        vi.mul_(decay).addcmul_(grad, grad, value=1.0 - decay)
        ref_adam.append(g / (torch.sqrt(vi / (1.0 - decay**t)) + eps))
    adams = fused.adam_directions_(v, grads, gs, steps, decay, eps)
    for a, b in zip(v + adams, ref_v + ref_adam):
        assert torch.equal(a, b)
    tiny = torch.finfo(F64).tiny
    scales = fused.graft_tensor_scales(adams, hs, lrs)
    for sc, a, h, lr in zip(scales, adams, hs, lrs):
        want = -lr * torch.linalg.vector_norm(a) / torch.clamp(torch.linalg.vector_norm(h),
                                                                min=tiny)
        _close(sc, want)
    # per row: the two (3, 4) tensors stacked, rows along axis 1 (an nn.Linear weight)
    A, H = torch.stack([adams[0], adams[2]]), torch.stack([hs[0], hs[2]])
    rows = fused.graft_rows_stacked(A, H, (1,))
    for i, j in enumerate((0, 2)):
        ratio = torch.linalg.vector_norm(adams[j], dim=(1,), keepdim=True) / torch.clamp(
            torch.linalg.vector_norm(hs[j], dim=(1,), keepdim=True), min=tiny)
        _close(rows[i], hs[j] * ratio)
    assert _syncs(fused.adam_directions_, [t.clone() for t in v], grads, gs, steps, decay,
                  eps) == {}
    assert _syncs(fused.graft_tensor_scales, adams, hs, lrs) == {}
    assert _syncs(fused.graft_rows_stacked, A, H, (1,)) == {}


# -- the non-finite skip as a mask ------------------------------------------------------------
def test_update_equals_the_loop_and_a_nonfinite_step_changes_nothing() -> None:
    params, hs = _tensors(13), _tensors(14)
    scales = [torch.tensor(-0.01 * (i + 1), dtype=F64) for i in range(len(params))]
    factors = [1.0 - 0.1 * 1e-4] * len(params)
    one = torch.ones((), dtype=torch.float32)
    grads = _tensors(15)
    found = fused.found_nonfinite(grads, one)
    assert found.item() == 0.0
    ref = [p.clone() for p in params]
    for p, h, sc, f in zip(ref, hs, scales, factors):  # SLNB._apply
        p.mul_(f)
        p.addcmul_(h, sc)
    new = [p.clone() for p in params]
    fused.apply_update_(new, hs, scales, factors, found)
    for a, b in zip(new, ref):
        _close(a, b)

    grads[3][1] = float("nan")
    bad_hs = [h.clone() for h in hs]
    bad_hs[3][1] = float("nan")  # what a NaN gradient makes of the direction
    found = fused.found_nonfinite(grads, one)
    assert found.item() == 1.0
    kept = [p.clone() for p in params]
    fused.apply_update_(kept, bad_hs, scales, factors, found)
    for a, b in zip(kept, params):
        assert torch.equal(a, b)
    state = [p.clone() for p in params]
    fused.keep_where_(found, state, [h * 2 for h in bad_hs])
    for a, b in zip(state, params):
        assert torch.equal(a, b)
    assert _syncs(fused.found_nonfinite, grads, one) == {}
    assert _syncs(fused.apply_update_, kept, bad_hs, scales, factors, found) == {}


def test_nonfinite_check_reads_elements_not_an_overflowing_norm() -> None:
    """Large finite float32 gradients are not a skip (their float32 norm overflows to inf)."""
    grads = [torch.full((4,), 3e38, dtype=torch.float32)]
    assert not torch.isfinite(torch._foreach_norm(grads)[0])  # today's check would skip
    assert fused.found_nonfinite(grads, torch.ones(())).item() == 0.0
    assert torch.equal(grads[0], torch.full((4,), 3e38))  # multiplied by one: unchanged
    grads[0][2] = float("-inf")
    assert fused.found_nonfinite(grads, torch.ones(())).item() == 1.0


# -- captures ---------------------------------------------------------------------------------
def test_moments_and_token_counts_without_temporaries_or_bincount() -> None:
    torch.manual_seed(16)
    xs = [torch.randn(n, 5, dtype=F64) for n in (7, 3)]
    sx, sx2 = torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)
    ones = torch.ones(7, dtype=F64)
    for x in xs:
        fused.add_moments_(sx, sx2, x, ones)
    dense = torch.cat(xs)
    _close(sx, dense.sum(0))
    _close(sx2, torch.diagonal(dense.T @ dense))
    counts, one = torch.zeros(11, dtype=F64), torch.ones((), dtype=F64)
    idx = [torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (9,))]
    for i in idx:
        fused.add_token_counts_(counts, i, one)
    want = torch.bincount(torch.cat([i.reshape(-1) for i in idx]), minlength=11).to(F64)
    assert torch.equal(counts, want)
    assert _syncs(fused.add_moments_, sx, sx2, xs[0], ones) == {}
    # the hook's maths in three device ops (the budget is four per layer and micro-batch)
    counter = _bench().count_ops_in(fused.add_moments_, sx, sx2, xs[1], ones)
    assert counter.device_ops("other") - counter.views("other") == 3
    assert _syncs(fused.add_token_counts_, counts, idx[0], one) == {}
    counter = _bench().count_ops_in(fused.add_token_counts_, counts, idx[1], one)
    assert counter.device_ops("other") - counter.views("other") == 1  # index_add_ alone


def test_skip_log_counts_each_masked_step_once_without_a_device_read() -> None:
    one = torch.ones(())
    log = fused.SkipLog()
    flags = [fused.found_nonfinite([torch.tensor([v])], one) for v in (1.0, float("inf"), 2.0)]
    assert _syncs(log.record, flags[0]) == {}  # the hot path: a non-blocking copy only
    log.record(flags[1])
    assert log.poll() == 1 and log.skipped == 1
    assert log.poll() == 0  # counted once
    log.record(flags[2])
    log.record(flags[1])
    assert log.flush() == 1 and log.skipped == 2


def test_composed_default_step_equals_slnb_and_skips_a_nonfinite_step_as_a_mask() -> None:
    """The default preset's step composed from ``fused`` (scripts/count_fused_ops.py) equals
    today's ``SLNB`` step, and a NaN gradient leaves parameters and state bit for bit, with no
    sync, as today's skip does (which then does not count the step either)."""
    pytest.importorskip("transformers")
    import copy
    import warnings

    from hf_slnb import SLNB

    mod = load_script("count_fused_ops")
    model = _bench().build_count_model("gpt2-2l", 8, 32).double().train()
    twin = copy.deepcopy(model)
    opt = SLNB(model.parameters(), model=model, lr=3e-3, weight_decay=1e-4)
    ref = SLNB(twin.parameters(), model=twin, lr=3e-3, weight_decay=1e-4)
    fz = mod.FusedGraftRow(opt, 3e-3, 1e-4)
    gen = torch.Generator().manual_seed(0)
    for k in range(4):
        x = torch.randint(0, 32, (2, 8), generator=gen)
        for m in (model, twin):
            torch.manual_seed(k)
            m(input_ids=x, labels=x).loss.backward()
        if k == 2:  # a NaN gradient in both
            next(model.parameters()).grad[0, 0] = float("nan")
            next(twin.parameters()).grad[0, 0] = float("nan")
        fz.load_captures(opt)
        before = [t.clone() for t in list(model.parameters()) + fz.state()]
        if k == 2:
            assert _syncs(fz.step) == {}
        else:
            fz.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref.step()
        opt.clear_captures()
        with torch.no_grad():
            for a, b in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        if k == 2:
            after = list(model.parameters()) + fz.state()
            assert all(torch.equal(a, b) for a, b in zip(after, before))
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    assert ref.skipped_steps == 1 and fz.log.flush() == 1


def test_composed_paper_step_with_masked_pcg_equals_slnb_without_a_sync() -> None:
    """``preset="paper"`` composed from ``fused`` (stacked matrix-free PCG with masks, global
    radius) equals today's ``SLNB``, whose PCG exits early on the CPU."""
    transformers = pytest.importorskip("transformers")
    import copy

    from hf_slnb import SLNB

    mod = load_script("count_fused_ops")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, vocab_size=32, max_position_embeddings=8,
        tie_word_embeddings=False)).double().train()
    twin = copy.deepcopy(model)
    kw = {"preset": "paper", "metric_backend": "matrix_free"}
    opt = SLNB(model.parameters(), model=model, **kw)
    ref = SLNB(twin.parameters(), model=twin, **kw)
    fz = mod.FusedPaper(opt)
    start = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    for k in range(3):
        x = torch.randint(0, 32, (2, 8), generator=gen)
        for m in (model, twin):
            m(input_ids=x, labels=x).loss.backward()
        if k == 2:
            assert _syncs(fz.step) == {}
        else:
            fz.step()
        ref.step()
        opt.clear_captures()
        with torch.no_grad():
            for a, b in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    with torch.no_grad():  # the steps did move the parameters
        assert max(float((a - b).abs().max()) for a, b in zip(model.parameters(), start)) > 1e-3
