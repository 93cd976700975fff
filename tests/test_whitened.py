"""Dense float64 checks of the candidate directions of ``hf_slnb.whitened`` (issue 13)."""

from __future__ import annotations

import pytest
import torch

from hf_slnb import whitened as W

D = torch.float64
# The whitened preset steps at lr_scale = 10 times its lr: its lr=1e-3 below is a step of 1e-2.


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g, dtype=D) * torch.linspace(0.1, 3.0, d, dtype=D)
    return x.T @ x / (4 * d) + 0.05 * torch.eye(d, dtype=D)


def _dense_inv_sqrt(c: torch.Tensor) -> torch.Tensor:
    # Independent: R with R R = C⁻¹, from solve and a symmetric square root by eigh of C⁻¹.
    c_inv = torch.linalg.solve(c, torch.eye(c.shape[0], dtype=D))
    lam, q = torch.linalg.eigh(c_inv)
    return q @ torch.diag(lam.sqrt()) @ q.T


def _assert_whitens(w: torch.Tensor, c: torch.Tensor) -> None:
    """``w`` is a whitening factor of ``c`` (stacks too): ``W Wᵀ = C⁻¹`` (by ``solve``), hence
    ``Wᵀ C W = I`` and ``W = C^{-1/2} R`` with ``R`` orthogonal, which gives the same update."""
    eye = torch.eye(c.shape[-1], dtype=c.dtype).expand_as(c)
    torch.testing.assert_close(w @ w.mT, torch.linalg.solve(c, eye), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w.mT @ c @ w, eye, rtol=1e-8, atol=1e-8)


def test_whitener_cholesky_whitens_and_flags_what_is_not_positive_definite():
    c = torch.stack([W.damp(_spd(8, 0), 0.1), W.damp(_spd(8, 1), 0.0), _spd(8, 2)])
    w, ok = W.whitener_cholesky(c)
    _assert_whitens(w, c)
    assert torch.equal(w, w.triu()) and ok.tolist() == [True, True, True]
    # A zero covariance (a layer fed zeros) and an indefinite one are flagged, no exception.
    bad = torch.stack([torch.zeros(8, 8, dtype=D), torch.diag(torch.linspace(-1, 1, 8, dtype=D))])
    assert W.whitener_cholesky(bad)[1].tolist() == [False, False]


@pytest.mark.parametrize("shape", [(6, 8), (8, 8), (12, 8)])
def test_whitened_orth_is_one_map_for_every_whitening_factor(shape):
    """``orth(M W) Wᵀ`` with the Cholesky factor is ``orth(M C^-1/2) C^-1/2`` (Newton-Schulz
    commutes with the orthogonal ``R`` in ``W = C^-1/2 R``): the plain form, blocks, and the Gram
    forms, iterated and spectral, against the dense symmetric root."""
    m = torch.randn(3, *shape, dtype=D)

    def check(w: torch.Tensor, root: torch.Tensor) -> None:
        o = W.orthogonalize_ns5(m @ root)
        u = o @ root
        u = u * torch.linalg.matrix_norm(o, keepdim=True) / torch.linalg.matrix_norm(u, keepdim=True)
        torch.testing.assert_close(W.whitened_orth(m, w), u, rtol=1e-9, atol=1e-12)
        for spectral in (False, True):
            torch.testing.assert_close(W.whitened_orth_gram(m, w, w @ w.mT, spectral=spectral),
                                       u, rtol=1e-6, atol=1e-9)

    c = torch.stack([W.damp(_spd(8, i), 0.1) for i in range(3)])
    check(W.whitener_cholesky(c)[0], torch.stack([_dense_inv_sqrt(ci) for ci in c]))
    # Two diagonal blocks of 4 features: C is their block diagonal.
    cb = torch.stack([torch.stack([W.damp(_spd(4, 2 * i + k), 0.1) for k in range(2)])
                      for i in range(3)])
    check(W.whitener_cholesky(cb)[0],
          torch.stack([torch.block_diag(*(_dense_inv_sqrt(b) for b in blocks)) for blocks in cb]))


def test_size_and_out_scale_the_update_in_the_pass_that_writes_it():
    """``size`` multiplies the update and ``out`` (the optimizer's update buffer, transposed for
    an HF ``Conv1D``'s ``(in, out)`` layout) receives it, for every form of the map, against the
    dense definition: ``size · orth(M C^-1/2) C^-1/2`` at ``‖orth(M C^-1/2)‖_F``; the diagonal
    form with ``C = diag(D)``."""
    m = torch.randn(3, 6, 8, dtype=D)
    c = torch.stack([W.damp(_spd(8, i), 0.1) for i in range(3)])
    w = W.whitener_cholesky(c)[0]
    root = torch.stack([_dense_inv_sqrt(ci) for ci in c])
    o = W.orthogonalize_ns5(m @ root)
    u = o @ root
    u = 0.7 * u * torch.linalg.matrix_norm(o, keepdim=True) / torch.linalg.matrix_norm(
        u, keepdim=True)
    forms = {
        "plain": lambda **kw: W.whitened_orth(m, w, **kw),
        "gram": lambda **kw: W.whitened_orth_gram(m, w, w @ w.mT, **kw),
        "spectral": lambda **kw: W.whitened_orth_gram(m, w, w @ w.mT, spectral=True, **kw),
    }
    for name, form in forms.items():
        tol = {"rtol": 1e-9, "atol": 1e-12} if name == "plain" else {"rtol": 1e-6, "atol": 1e-9}
        torch.testing.assert_close(form(size=0.7), u, **tol)
        for buf in (torch.empty(3, 6, 8, dtype=D), torch.empty(3, 8, 6, dtype=D).mT):
            got = form(size=0.7, out=buf)
            assert got is buf, name
            torch.testing.assert_close(buf, u, **tol)
    d = torch.rand(3, 8, dtype=D) + 0.5  # D^-1/2 per feature
    od = W.orthogonalize_ns5(m * d[:, None, :])
    ud = od * d[:, None, :]
    ud = 0.7 * ud * torch.linalg.matrix_norm(od, keepdim=True) / torch.linalg.matrix_norm(
        ud, keepdim=True)
    buf = torch.empty(3, 6, 8, dtype=D)
    assert W.diag_whitened_orth(m, d, size=0.7, out=buf) is buf
    torch.testing.assert_close(buf, ud, rtol=1e-9, atol=1e-12)
    rows = W.whitened_orth(m, w, per_row=True)
    torch.testing.assert_close(W.whitened_orth(m, w, per_row=True, size=0.7), 0.7 * rows)


def test_centred_second_moment_and_damping():
    x = torch.randn(50, 6, dtype=D)
    c = W.centred_second_moment(x.sum(0), x.T @ x, 50)
    torch.testing.assert_close(c, torch.cov(x.T, correction=0))
    damped = W.damp(c, 0.1)
    torch.testing.assert_close(damped - c, 0.1 * torch.trace(c) / 6 * torch.eye(6, dtype=D))
    with pytest.raises(ValueError, match="damping=-1"):
        W.damp(c, -1)


@pytest.mark.parametrize("method", ["eigh", "newton_schulz"])
def test_inverse_sqrt(method):
    c = W.damp(_spd(8, 0), 0.1)
    r = (W.inverse_root_eigh(c)[0] if method == "eigh"
         else W.inverse_sqrt_newton_schulz(c, iters=40))
    torch.testing.assert_close(r, _dense_inv_sqrt(c), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(r @ c @ r, torch.eye(8, dtype=D), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])
def test_orthogonalize_ns5_is_polynomial_of_singular_values(shape):
    m = torch.randn(*shape, dtype=D)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    s = s / torch.linalg.matrix_norm(m)
    a, b, c = W.NS5_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    torch.testing.assert_close(W.orthogonalize_ns5(m, eps=0.0), u @ torch.diag(s) @ vh)
    # Many steps drive the singular values into Muon's band around 1 (not exactly 1: quintic).
    sv = torch.linalg.svdvals(W.orthogonalize_ns5(m, steps=30))
    assert bool(((sv > 0.6) & (sv < 1.25)).all()), sv


def test_whitened_orth_definition():
    m = torch.randn(6, 8, dtype=D)
    c = W.damp(_spd(8, 1), 0.1)
    r = _dense_inv_sqrt(c)
    # Definition with a near-exact orth (polar factor by SVD replaced by many NS steps is not
    # exact, so compare against the NS map of the dense whitened gradient).
    o = W.orthogonalize_ns5(m @ r)
    u = o @ r
    u = u * torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(u)
    torch.testing.assert_close(W.whitened_orth(m, W.inverse_root_eigh(c)[0]), u)
    # With C = I it is Muon's direction exactly.
    torch.testing.assert_close(W.whitened_orth(m, torch.eye(8, dtype=D)), W.orthogonalize_ns5(m))
    rows = W.whitened_orth(m, r, per_row=True)
    rms = rows.pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, u.pow(2).mean().sqrt().item()))


@pytest.mark.parametrize("two_sided", [False, True])
def test_eigenbasis_adam_definition(two_sided):
    g1, g2, m = (torch.randn(4, 6, dtype=D) for _ in range(3))
    c = _spd(6, 2)
    q_in = torch.linalg.eigh(c)[1]
    q_out = torch.linalg.eigh(_spd(4, 3))[1] if two_sided else None
    qo = q_out if two_sided else torch.eye(4, dtype=D)
    v = torch.zeros(4, 6, dtype=D)
    W.rotated_sq_update(v, g1, q_in, q_out, 0.9)
    W.rotated_sq_update(v, g2, q_in, q_out, 0.9)
    # Dense: explicit rotations, elementwise Adam, explicit inverse rotations.
    r1, r2 = qo.T @ g1 @ q_in, qo.T @ g2 @ q_in
    v_ref = 0.9 * 0.1 * r1**2 + 0.1 * r2**2
    torch.testing.assert_close(v, v_ref)
    bc1, bc2 = 1 - 0.9**2, 1 - 0.9**2
    want = qo @ (((qo.T @ m @ q_in) / bc1) / ((v_ref / bc2).sqrt() + 1e-8)) @ q_in.T
    got = W.eigenbasis_adam(m, v, q_in, q_out, bc1, bc2)
    torch.testing.assert_close(got, want)
    # With C diagonal (Q = I up to order) and one side, it is plain Adam.
    eye = torch.eye(6, dtype=D)
    torch.testing.assert_close(W.eigenbasis_adam(m, v_ref, eye), m / (v_ref.sqrt() + 1e-8))


def test_whitened_orth_direction_class_equals_its_definition() -> None:
    """Core v2's ``direction='whitened_orth'`` (preset 'whitened') on one Linear, in float64:
    ``W - lr 0.2 sqrt(max(out, in)) orth(G C^-1/2) C^-1/2`` (Muon's size, then RMS 0.2: one
    lr, AdamW's), the bias with Adam's step."""
    from torch import nn

    from hf_slnb import SLNB

    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()
    x = torch.randn(50, 6, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2, 2.0, 1.0, 3.0],
                                                                dtype=torch.float64) + 1.5
    opt = SLNB(lin.parameters(), model=lin, preset="whitened", momentum=0.0, weight_decay=0.0,
               lr=1e-3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin(x).pow(3).mean().backward()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    opt.step()
    mean = x.mean(0)
    c = (x.T @ x) / x.shape[0] - torch.outer(mean, mean)
    root, _, _ = W.inverse_root_eigh(W.damp(c, 0.1))
    u = W.whitened_orth(gw, root) * 0.2 * 6 ** 0.5  # RMS 0.2 for an exact orth of (4, 6)
    torch.testing.assert_close(lin.weight.detach(), w0 - 1e-2 * u, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lin.bias.detach(), b0 - 1e-2 * gb / (gb.abs() + 1e-8),
                               rtol=1e-9, atol=1e-12)
    assert set(opt.state[lin.weight]) >= {"input_cov", "input_inv_sqrt", "momentum_buffer"}


@pytest.mark.parametrize("bias", [True, False])
def test_diag_whitened_orth_direction_class_equals_its_definition(bias: bool) -> None:
    """``direction='diag_whitened_orth'`` on one Linear, in float64: ``orth(G D^-1/2) D^-1/2``
    with ``D`` SLNB's diagonal metric (the features' variance with 0.1 of the mean variance mixed
    in; plus the squared mean without a bias), at RMS 0.2 lr; the bias takes Adam's step."""
    from torch import nn

    from hf_slnb import SLNB

    torch.manual_seed(0)
    lin = nn.Linear(6, 9, bias=bias).double()
    x = torch.randn(50, 6, dtype=D) * torch.tensor([1.0, 5.0, 0.2, 2.0, 1.0, 3.0], dtype=D) + 1.5
    opt = SLNB(lin.parameters(), model=lin, preset="whitened", direction="diag_whitened_orth",
               momentum=0.0, weight_decay=0.0, lr=1e-3)
    w0 = lin.weight.detach().clone()
    lin(x).pow(3).mean().backward()
    gw = lin.weight.grad.clone()
    gb = lin.bias.grad.clone() if bias else None
    b0 = lin.bias.detach().clone() if bias else None
    opt.step()
    mean = x.mean(0)
    var = x.pow(2).mean(0) - mean * mean
    d = 0.9 * var + 0.1 * var.mean()
    if not bias:
        d = d + mean * mean
    r = torch.diag(d.rsqrt())
    o = W.orthogonalize_ns5(gw @ r)
    u = o @ r
    u = u * torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(u) * 0.2 * 9 ** 0.5
    torch.testing.assert_close(lin.weight.detach(), w0 - 1e-2 * u, rtol=1e-6, atol=1e-9)
    if bias:
        torch.testing.assert_close(lin.bias.detach(), b0 - 1e-2 * gb / (gb.abs() + 1e-8),
                                   rtol=1e-9, atol=1e-12)
    assert "input_cov" not in opt.state[lin.weight]  # no x x^T, no inverse root


def test_layers_reading_one_input_share_its_product_and_each_get_their_covariance(
        monkeypatch) -> None:
    """q/k/v-style layers read one tensor: one ``x^T x`` and column sum (``SharedGram``, round
    12's :func:`sampled_moments`) serves them, and every layer's input covariance and feature
    statistics still equal the dense ones of its own input. (Layers that are not whitened take
    the column sums of ``SharedSums`` instead.)"""
    from torch import nn

    from hf_slnb import SLNB
    from hf_slnb.layers import base, linear

    reductions = []
    real, real_moments = base.column_sums, linear.sampled_moments

    def counted(x, dtype):  # type: ignore[no-untyped-def]
        reductions.append(("sums", tuple(x.shape)))
        return real(x, dtype)

    def counted_moments(x, *args):  # type: ignore[no-untyped-def]
        reductions.append(("moments", tuple(x.shape)))
        return real_moments(x, *args)

    monkeypatch.setattr(base, "column_sums", counted)
    monkeypatch.setattr(linear, "sampled_moments", counted_moments)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.o = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
            self.head = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.q(x)) * self.k(x)
            return self.head(torch.tanh(self.o(h)))

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(40, 5, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0], dtype=D) + 0.7
    opt = SLNB(net.parameters(), model=net, preset="whitened")
    net(x).pow(2).mean().backward()
    with torch.no_grad():
        h = torch.tanh(net.q(x)) * net.k(x)
    opt.step()

    def dense_cov(z: torch.Tensor) -> torch.Tensor:
        zc = z - z.mean(0)
        return zc.T @ zc / z.shape[0]

    for layer, inp in ((net.q, x), (net.k, x), (net.o, h)):
        torch.testing.assert_close(opt.state[layer.weight]["input_cov"],
                                   (1 - 0.95) * dense_cov(inp), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[layer.weight]["mu"], (1 - 0.9) * inp.mean(0))
        torch.testing.assert_close(opt.state[layer.weight]["nu"],
                                   (1 - 0.999) * inp.pow(2).mean(0))
    # The head's input, h (o), x (q and k): 4 layers, all whitened (no repeated blocks here)
    assert reductions == [("moments", (40, 3)), ("moments", (40, 5)), ("moments", (40, 5))], \
        reductions


def test_the_feature_emas_fold_once_when_a_step_also_asks_for_the_preconditioner_terms(
        monkeypatch) -> None:
    """``whitened_orth`` folds a bank's sums into its EMAs without the diagonal preconditioner's
    terms (``StepContext.fold``); a later ``statistics`` in the same step adds the terms from
    the folded EMAs and does not fold again. Against the dense means of the input (float64)."""
    from torch import nn

    from hf_slnb import SLNB
    from hf_slnb import directions as Dn

    seen = []
    real = Dn.WhitenedOrth.update_covariance

    def update_then_ask(self, ctx, bank, owner):  # type: ignore[no-untyped-def]
        real(self, ctx, bank, owner)
        seen.append(ctx.statistics(bank))

    monkeypatch.setattr(Dn.WhitenedOrth, "update_covariance", update_then_ask)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4)).double()
    x = torch.randn(30, 5, dtype=D) * 2.0 + 0.5
    opt = SLNB(net.parameters(), model=net, preset="whitened", orth_layers="hidden")
    net(x).pow(2).mean().backward()
    opt.step()
    assert len(seen) == 1
    mean, sq = x.mean(0), x.pow(2).mean(0)
    state = opt.state[net[0].weight]
    torch.testing.assert_close(state["mu"], (1 - 0.9) * mean)  # one fold, not two
    torch.testing.assert_close(state["nu"], (1 - 0.999) * sq)
    torch.testing.assert_close(seen[0].mu[0], mean)  # bias-corrected after one step
    torch.testing.assert_close(seen[0].nu[0], sq)
    var = sq - mean**2  # with a bias: the variance, shrunk towards its mean (shrinkage)
    shrink = opt.param_groups[0]["shrinkage"]
    want = 1.0 / ((1 - shrink) * var + shrink * var.mean())
    torch.testing.assert_close(seen[0].inv[0], want)


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class _Classifier(torch.nn.Module):
    """Two repeated blocks, then a pooler and a classifier beside them (BERT's shape), the
    pooler the same shape as the blocks' layers."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(d) for _ in range(2))
        self.pooler = torch.nn.Linear(d, d)
        self.classifier = torch.nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.tanh(self.pooler(x)))


def _one_step(net: torch.nn.Module, **options: object) -> tuple[object, dict, dict]:
    from hf_slnb import SLNB

    x = torch.randn(30, 5, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0], dtype=D) + 0.7
    opt = SLNB(net.parameters(), model=net, preset="whitened", momentum=0.0, weight_decay=0.0,
               lr=1e-3, **options)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.nn.functional.cross_entropy(net(x), torch.arange(30) % 2).backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    return opt, before, grads


@pytest.mark.parametrize("orth_layers", ["blocks", "hidden"])
def test_orth_layers_picks_the_layers_inside_repeated_blocks(orth_layers: str) -> None:
    """``orth_layers='blocks'`` (the whitened preset's): only the Linear layers inside the
    ModuleList's blocks are orthogonalised; the pooler (banked apart although it has their shape)
    and the classifier take Adam's step, ``lr g / (|g| + eps)`` on the first step, as Muon's
    authors do. ``'hidden'`` orthogonalises them too (the rule that failed to fine-tune MiniLM)."""
    torch.manual_seed(0)
    net = _Classifier().double()
    opt, before, grads = _one_step(net, orth_layers=orth_layers)
    params = dict(net.named_parameters())
    orthogonalised = {n for n, p in params.items() if "input_cov" in opt.state[p]}
    blocks = {"blocks.0.fc.weight", "blocks.1.fc.weight"}
    assert orthogonalised == (blocks if orth_layers == "blocks" else
                              blocks | {"pooler.weight", "classifier.weight"})
    for name in ("pooler.weight", "classifier.weight"):
        adam = before[name] - 1e-2 * grads[name] / (grads[name].abs() + 1e-8)
        if orth_layers == "blocks":
            torch.testing.assert_close(params[name].detach(), adam, rtol=1e-9, atol=1e-12)
        else:
            assert not torch.allclose(params[name].detach(), adam)


@pytest.mark.parametrize("direction", ["whitened_orth", "diag_whitened_orth"])
def test_orth_rest_diagonal_gives_the_other_layers_slnb_direction_at_adams_row_length(
        direction: str) -> None:
    """``orth_rest='diagonal'``: the layers outside the blocks take SLNB's diagonal direction
    (features centred and scaled by their shrunk variance; the bias absorbs the mean) at the
    length of Adam's step per output row; the blocks are orthogonalised as before. Dense check
    of the classifier's first step (momentum 0: ``g`` is the gradient; Adam's step
    ``g / (|g| + eps)``)."""
    torch.manual_seed(0)
    net = _Classifier().double()
    seen = {}
    net.classifier.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach()))
    opt, before, grads = _one_step(net, orth_rest="diagonal", direction=direction)
    x, gw, gb = seen["x"], grads["classifier.weight"], grads["classifier.bias"]
    mu, var = x.mean(0), x.var(0, unbiased=False)
    var = 0.9 * var + 0.1 * var.mean()  # shrinkage 0.1
    w = (gw - gb[:, None] * mu[None, :]) / var  # SLNB's diagonal direction, with the bias
    b = gb - w @ mu
    adam_w, adam_b = gw / (gw.abs() + 1e-8), gb / (gb.abs() + 1e-8)
    w = w * (adam_w.norm(dim=1) / w.norm(dim=1))[:, None]  # Adam's length, row by row
    b = b * adam_b.abs() / b.abs()  # a bias row is one number
    params = dict(net.named_parameters())
    torch.testing.assert_close(params["classifier.weight"].detach(),
                               before["classifier.weight"] - 1e-2 * w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(params["classifier.bias"].detach(),
                               before["classifier.bias"] - 1e-2 * b, rtol=1e-9, atol=1e-12)
    if direction == "whitened_orth":
        assert "input_cov" in opt.state[params["blocks.0.fc.weight"]]  # still orthogonalised
    assert opt.config.record()["orth_rest"] == "diagonal"


def test_orth_layers_falls_back_to_every_hidden_layer_without_blocks() -> None:
    """A model with no repeated block (a plain MLP in one nn.Sequential) orthogonalises every
    hidden layer, as 'hidden' does; the model's last Linear is no language-model head."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 2)).double()
    opt, _, _ = _one_step(net)
    assert all("input_cov" in opt.state[m.weight] for m in (net[0], net[2]))


@pytest.mark.parametrize("preset", ["whitened", "whitened:diag"])
def test_a_model_with_no_layer_to_orthogonalise_is_told_so(preset: str) -> None:
    """An orthogonalising preset on a model of convolutions and embeddings is AdamW: a warning
    says so and names the cure; a model with a layer to orthogonalise gets no such warning."""
    import warnings

    from hf_slnb import SLNB

    options = {"direction": "diag_whitened_orth"} if preset.endswith("diag") else {}
    convs = torch.nn.Sequential(torch.nn.Embedding(10, 3), torch.nn.Conv1d(5, 8, 3),
                                torch.nn.ReLU(), torch.nn.Conv1d(8, 8, 3))
    with pytest.warns(UserWarning, match=r"no layer of this model is orthogonalised .*1 "
                                         r"Embedding, 2 Conv1d.*Use preset='graft'"):
        SLNB(convs.parameters(), model=convs, preset="whitened", **options)
    mlp = torch.nn.Sequential(torch.nn.Conv1d(5, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SLNB(mlp.parameters(), model=mlp, preset="whitened", **options)
        # orth_rest='diagonal' gives those layers graft's step: no AdamW to warn of
        SLNB(convs.parameters(), model=convs, preset="whitened", orth_rest="diagonal", **options)


def _refused_across(option: str, bad: str, allowed: str, saved: str):
    """A bad ``option`` value is refused naming the allowed ones; a checkpoint made with
    ``saved`` is refused by the preset's value, naming both. Returns that checkpoint's state and
    an optimizer with the preset's value."""
    from hf_slnb import SLNB

    torch.manual_seed(0)
    net = _Classifier().double()
    with pytest.raises(ValueError, match=rf"{option}='{bad}'.*{allowed}"):
        SLNB(net.parameters(), model=net, preset="whitened", **{option: bad})
    opt, _, _ = _one_step(net, **{option: saved})
    state = opt.state_dict()
    opt.remove_hooks()
    fresh = SLNB(net.parameters(), model=net, preset="whitened")
    with pytest.raises(ValueError, match=rf"{option}: checkpoint '{saved}'.*{option}='{saved}'"):
        fresh.load_state_dict(state)
    for group in state["param_groups"]:
        del group["slnb"][option]  # as written before the option existed
    return state, fresh


def test_orth_layers_is_checked_and_recorded() -> None:
    """A checkpoint of 'hidden' is refused by 'blocks', and so is one of an hf_slnb before the
    option (it kept covariances for the pooler)."""
    state, fresh = _refused_across("orth_layers", "all", r"\('blocks', 'hidden'\)", "hidden")
    with pytest.raises(ValueError, match=r"input covariance for parameter 'pooler.weight'.*"
                                         r"orth_layers='hidden'"):
        fresh.load_state_dict(state)


def test_orth_rest_is_checked_and_recorded() -> None:
    """A checkpoint of 'diagonal' is refused by 'adam' (its layers' statistics mean another
    step); one of an hf_slnb before the option (no record of it: it was 'adam') loads into
    'adam' and is refused by 'diagonal'."""
    _refused_across("orth_rest", "sgd", r"\('adam', 'diagonal'\)", "diagonal")
    from hf_slnb import SLNB

    net = _Classifier().double()
    opt, _, _ = _one_step(net)
    state = opt.state_dict()
    opt.remove_hooks()
    for group in state["param_groups"]:
        del group["slnb"]["orth_rest"]
    diagonal = SLNB(net.parameters(), model=net, preset="whitened", orth_rest="diagonal")
    with pytest.raises(ValueError, match=r"orth_rest: checkpoint 'adam', this optimizer "
                                         r"'diagonal'"):
        diagonal.load_state_dict(state)
    diagonal.remove_hooks()
    SLNB(net.parameters(), model=net, preset="whitened").load_state_dict(state)


def test_lr_scale_multiplies_the_step_and_the_weight_decay() -> None:
    """The whitened preset steps at ``lr_scale * lr`` = 10 lr: with momentum 0 the classifier's
    first step (Adam's: ``g / (|g| + eps)``) under weight decay 0.1 is, dense,
    ``p (1 - 10 lr wd) - 10 lr g / (|g| + eps)``; and ``lr_scale=3`` under ``graft`` is ``graft``
    at 3 lr, step for step."""
    from hf_slnb import SLNB

    torch.manual_seed(0)
    net = _Classifier().double()
    x = torch.randn(30, 5, dtype=D)
    opt = SLNB(net.parameters(), model=net, preset="whitened", momentum=0.0, weight_decay=0.1,
               lr=2e-3)
    assert opt.config.lr_scale == 10.0
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.nn.functional.cross_entropy(net(x), torch.arange(30) % 2).backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    for name in ("classifier.weight", "classifier.bias"):
        g, p0 = grads[name], before[name]
        want = p0 * (1 - 10 * 2e-3 * 0.1) - 10 * 2e-3 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(dict(net.named_parameters())[name].detach(), want,
                                   rtol=1e-12, atol=1e-14)
    opt.remove_hooks()
    finals = []
    for lr, scale in ((3e-3, 3.0), (9e-3, 1.0)):
        torch.manual_seed(1)
        net = _Classifier().double()
        opt = SLNB(net.parameters(), model=net, lr=lr, lr_scale=scale, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), torch.arange(30) % 2).backward()
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        opt.remove_hooks()
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"lr_scale=0.0.*finite number > 0"):
        SLNB(net.parameters(), model=net, lr_scale=0.0)


def test_a_checkpoint_resumes_only_at_its_own_lr_scale() -> None:
    """A checkpoint of the whitened preset (lr_scale 10) is refused by lr_scale=1, naming it;
    one written before the option (no record: it stepped at lr) is refused by the preset and
    loads with lr_scale=1, so no run resumes at 10x its step."""
    from hf_slnb import SLNB

    net = _Classifier().double()
    opt, _, _ = _one_step(net)
    state = opt.state_dict()
    opt.remove_hooks()
    one = SLNB(net.parameters(), model=net, preset="whitened", lr_scale=1.0)
    with pytest.raises(ValueError, match=r"lr_scale: checkpoint 10.0, this optimizer 1.0.*"
                                         r"lr_scale=10.0"):
        one.load_state_dict(state)
    for group in state["param_groups"]:
        del group["slnb"]["lr_scale"]  # as written before the option existed
    preset = SLNB(net.parameters(), model=net, preset="whitened")
    with pytest.raises(ValueError, match=r"lr_scale: checkpoint 1.0, this optimizer 10.0"):
        preset.load_state_dict(state)
    preset.remove_hooks()
    one.load_state_dict(state)


def test_cov_rows_strides_the_positions_of_the_covariance_and_rescales_them() -> None:
    """``cov_rows=10`` on 2 sequences of 20 positions: the covariance is that of every 7th row
    about its own mean (the smallest stride >= 4 coprime to 20, so the kept rows are six
    different positions of a sequence, not positions 0, 4, 8, ... of each), dense float64, and
    so are the feature statistics; layers that share the input still share the subsampled
    product."""
    from torch import nn

    from hf_slnb import SLNB

    torch.manual_seed(0)
    net = nn.ModuleDict({"q": nn.Linear(5, 5), "k": nn.Linear(5, 5)}).double()
    x = torch.randn(2, 20, 5, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0], dtype=D) + 0.7
    opt = SLNB(net.parameters(), model=net, preset="whitened", cov_rows=10)
    (net["q"](x) * net["k"](x)).pow(2).mean().backward()
    opt.step()
    kept = [(0, 0), (0, 7), (0, 14), (1, 1), (1, 8), (1, 15)]  # rows 0, 7, ..., 35
    sub = torch.stack([x[b, t] for b, t in kept])
    cov = torch.cov(sub.T, correction=0)  # the kept rows about their own mean: PSD
    for layer in (net["q"], net["k"]):
        torch.testing.assert_close(opt.state[layer.weight]["input_cov"], (1 - 0.95) * cov,
                                   rtol=1e-10, atol=1e-12)
        # Round 12: the feature statistics come from the same rows (their mean and mean
        # square; the squares from x xᵀ's diagonal), not from all 40.
        torch.testing.assert_close(opt.state[layer.weight]["mu"], (1 - 0.9) * sub.mean(0),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[layer.weight]["nu"],
                                   (1 - 0.999) * sub.pow(2).mean(0), rtol=1e-10, atol=1e-12)
    # Inputs with a large mean (GPT-2's residual stream): still positive semi-definite.
    lin = nn.Linear(5, 5).double()
    opt = SLNB(lin.parameters(), model=lin, preset="whitened", cov_rows=10)
    lin(x * 0.1 + 30.0).pow(2).mean().backward()
    opt.step()
    eig = torch.linalg.eigvalsh(opt.state[lin.weight]["input_cov"])
    assert float(eig.min()) >= -1e-9 * float(eig.mean()), eig


@pytest.mark.parametrize("d,block", [(10, 4), (8, 4), (5, 8), (600, 256)])
def test_upper_block_gram_and_its_symmetric_copy_are_x_transpose_x(d: int, block: int) -> None:
    """``add_gram_upper`` then ``symmetrized``: exactly the dense ``x^T x`` (float64), for sizes
    that are and are not multiples of the block."""
    from hf_slnb.layers.base import add_gram_upper, symmetrized

    torch.manual_seed(0)
    x = torch.randint(-9, 10, (7, d)).to(D)  # integers: exact sums, compared bit for bit
    gram = torch.zeros(d, d, dtype=D)
    add_gram_upper(gram, x, block)
    assert torch.equal(symmetrized(gram, block), x.T @ x)


@pytest.mark.parametrize("n,d", [(1, 3), (1100, 1024), (4097, 256), (0, 4), (96, 5)])
def test_column_sums_match_the_dense_sums(n: int, d: int) -> None:
    """The per-feature sums of a capture: ``Σ x`` and ``Σ x²`` over rows added in place, chunked
    on the CPU (row counts across chunk boundaries; a bfloat16 input summed in float32)."""
    from hf_slnb.layers.base import add_column_sums

    torch.manual_seed(0)
    x = torch.randn(n, d, dtype=D)
    sx, sx2 = torch.ones(d, dtype=D), torch.full((d,), 2.0, dtype=D)
    total = add_column_sums(sx, sx2, x.reshape(-1, 3, d) if n % 3 == 0 and n else x)
    torch.testing.assert_close(total, x.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sx, 1.0 + x.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sx2, 2.0 + (x * x).sum(0), rtol=1e-12, atol=1e-12)
    xb = x.to(torch.bfloat16)
    sx, sx2 = torch.zeros(d), torch.zeros(d)
    add_column_sums(sx, sx2, xb)
    torch.testing.assert_close(sx2.double(), xb.double().pow(2).sum(0), rtol=1e-5, atol=1e-5)


def test_column_sums_dispatch_four_ops_off_the_cpu_and_five_on_it() -> None:
    """Issue 10's hook budget: off the CPU (the meta device stands in for an accelerator) the
    sums cost four ops and no view; on the CPU one more (the squares, then their sum)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hf_slnb.layers.base import add_column_sums

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for device, want in (("meta", 4), ("cpu", 5)):
        x = torch.randn(4, 16, 8, device=device)
        sx, sx2 = torch.zeros(8, device=device), torch.zeros(8, device=device)
        with Count() as c:
            add_column_sums(sx, sx2, x)
        assert len(c.ops) == want, (device, c.ops)
        assert not any("view" in op for op in c.ops), c.ops


def test_row_stride_is_coprime_to_the_sequence_length() -> None:
    from hf_slnb.layers.base import row_stride

    assert row_stride(2048, 512, 128) == 5  # 4 divides 128
    assert row_stride(2048, 1024, 128) == 3
    assert row_stride(40, 10, 1) == 4  # a 2-D input: no sequence
    assert row_stride(45, 10, 9) == 5
    for n, rows, seq in ((2048, 512, 128), (40, 10, 20), (999, 100, 37)):
        k = row_stride(n, rows, seq)
        assert -(-n // k) <= rows
        kept = {(i % seq) for i in range(0, n, k)}
        assert len(kept) == min(seq, -(-n // k))  # distinct positions until all are covered


@pytest.mark.parametrize("every", [1, 3])
def test_whiten_every_sets_when_the_inverse_root_is_refreshed(every: int) -> None:
    """The stored whitening factor (``input_inv_sqrt``) whitens the damped, bias-corrected
    covariance EMA as it stood at the last refresh (steps 0, every, 2 every, ...), not after."""
    from torch import nn

    from hf_slnb import SLNB

    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    opt = SLNB(lin.parameters(), model=lin, preset="whitened", whiten_every=every, cov_every=1)
    cov = torch.zeros(4, 4, dtype=D)
    for step in range(4):
        x = torch.randn(30, 4, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=D) + step
        lin(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        m = x.mean(0)
        cov = 0.95 * cov + 0.05 * (x.T @ x / 30 - torch.outer(m, m))
        if step % every == 0:
            expected = W.damp(cov / (1 - 0.95 ** (step + 1)), 0.1)
        _assert_whitens(opt.state[lin.weight]["input_inv_sqrt"], expected)


def test_a_bert_classifier_orthogonalises_its_encoder_only() -> None:
    """On Hugging Face's BERT classifier (the MiniLM task's architecture) the whitened preset
    keeps covariances for the encoder's layers only; the pooler (the encoder's layers' shape)
    and the classifier take Adam's step."""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_slnb import SLNB

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16))
    opt = SLNB(model.parameters(), model=model, preset="whitened")
    ids = torch.randint(0, 50, (4, 8))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    opt.step()
    kept = {n for n, p in model.named_parameters() if "input_cov" in opt.state[p]}
    assert kept == {f"bert.encoder.layer.{i}.{m}.weight" for i in range(2) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense")}


def test_orth_dtype_picks_the_newton_schulz_precision() -> None:
    """``orth_dtype``: 'auto' is float32 on the CPU (bfloat16 matmuls there can be 10-60x
    slower) and bfloat16 on accelerators; float64 parameters stay float64. On a float32 layer
    the float32 map equals the dense float64 definition to float32 accuracy, and bfloat16 does
    not (so the option acts)."""
    from torch import nn

    from hf_slnb import SLNB

    assert W.ns_dtype(torch.float32, "cpu", "auto") == torch.float32
    assert W.ns_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    native = torch.bfloat16 if W.native_bf16_cpu() else torch.float32
    assert W.ns_dtype(torch.float32, "cpu", "auto", bf16_pays=True) == native
    assert W.ns_dtype(torch.float32, "cpu", "float32", bf16_pays=True) == torch.float32
    assert W.ns_dtype(torch.float32, "cuda", "auto") == torch.bfloat16
    assert W.ns_dtype(torch.float32, "cpu", "bfloat16") == torch.bfloat16
    assert W.ns_dtype(torch.float64, "cuda", "bfloat16") == torch.float64

    torch.manual_seed(0)
    x = torch.randn(200, 24, dtype=D) * torch.linspace(0.2, 4.0, 24, dtype=D) + 0.5
    lin0 = nn.Linear(24, 16).double()
    lin0(x).pow(3).mean().backward()
    g = lin0.weight.grad
    # Dense float64 reference: the quintic's polynomial of the singular values of G C^-1/2.
    mean = x.mean(0)
    c = x.T @ x / x.shape[0] - torch.outer(mean, mean)
    c = c + 0.1 * torch.trace(c) / 24 * torch.eye(24, dtype=D)
    r = _dense_inv_sqrt(c)
    u, s, vh = torch.linalg.svd(g @ r, full_matrices=False)
    s = s / s.pow(2).sum().sqrt()
    a, b, cc = W.NS5_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s**3 + cc * s**5
    o = u @ torch.diag(s) @ vh
    want = o @ r
    want = want * torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(want) * 0.2 * 24 ** 0.5

    errors = {}
    for choice in ("auto", "float32", "bfloat16"):
        lin = nn.Linear(24, 16, dtype=torch.float32)  # whatever the default dtype
        lin.load_state_dict({k: v.float() for k, v in lin0.state_dict().items()})
        opt = SLNB(lin.parameters(), model=lin, preset="whitened", orth_dtype=choice,
                   momentum=0.0, weight_decay=0.0, lr=1e-2)
        lin(x.float()).pow(3).mean().backward()
        opt.step()
        got = (lin0.weight.detach() - lin.weight.detach().double()) / 0.1  # the step lr_scale * lr
        errors[choice] = float((got - want).norm() / want.norm())
    # (24, 16) takes the Gram form in float32: about 5e-4 here, against bfloat16's 2e-2.
    assert errors["auto"] == errors["float32"] < 2e-3, errors
    assert 5 * errors["float32"] < errors["bfloat16"] < 0.2, errors


@pytest.mark.parametrize("blocks", [1, 2])
def test_whitened_orth_in_bfloat16_runs_its_whitening_products_in_it(blocks: int) -> None:
    """``dtype=bfloat16`` (round 12): ``M C^{-1/2}``, Newton-Schulz and ``O C^{-1/2}`` all
    multiply bfloat16 operands, and the float32 result stays within bfloat16's error of the
    float64 definition (the same map in float64, :func:`orthogonalize_ns5` with a dense
    ``C^{-1/2}``: blocks embedded in a block-diagonal matrix)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    m = torch.randn(3, 40, 24, dtype=D)
    b = 24 // blocks
    roots = torch.stack([torch.stack([W.inverse_root_eigh(W.damp(_spd(b, 3 * i + k), 0.1))[0]
                                      for k in range(blocks)]) for i in range(3)])
    dense = torch.stack([torch.block_diag(*r) for r in roots])
    x = m @ dense
    o = W.orthogonalize_ns5(x)
    want = o @ dense
    want = want * (torch.linalg.matrix_norm(o, keepdim=True)
                   / torch.linalg.matrix_norm(want, keepdim=True))

    class Dtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[torch.dtype] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "mm" in str(func):  # bmm, baddbmm, mm, matmul's kernels
                self.seen |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
            return func(*args, **(kwargs or {}))

    r = roots if blocks > 1 else roots[:, 0]
    with Dtypes() as d:
        got = W.whitened_orth(m.float(), r.float(), dtype=torch.bfloat16)
    assert d.seen == {torch.bfloat16}, d.seen
    assert got.dtype == torch.float32
    err = float((got.double() - want).norm() / want.norm())
    assert err < 0.05, err


@pytest.mark.parametrize("cpu", ["amx", "avx512_bf16", "none"])
def test_orth_dtype_auto_takes_bfloat16_on_a_cpu_that_has_it_for_layers_of_at_least_128(
        monkeypatch, cpu: str) -> None:
    """'auto' on the CPU: bfloat16 for the layers whose short side is at least ``BF16_CPU_MIN``
    (128) where the CPU multiplies bfloat16 natively (the probes stubbed three ways here),
    the elongated ones (1.5x longer than wide) only with AMX; float32 for smaller layers and on
    a CPU without it; a step then equals the one 'bfloat16' or 'float32' names, bit for bit,
    for a square and an elongated layer."""
    from types import SimpleNamespace

    from torch import nn

    from hf_slnb import SLNB
    from hf_slnb.directions import WhitenedOrth

    assert W.BF16_CPU_MIN == 128
    native, amx = cpu != "none", cpu == "amx"
    monkeypatch.setattr(W, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(W, "amx_cpu", lambda: amx)
    choose = WhitenedOrth(SimpleNamespace(orth_dtype="auto")).orth_dtype

    def pick(*shape: int, dtype: torch.dtype = torch.float32) -> torch.dtype:
        return choose(torch.zeros(shape, dtype=dtype))  # whatever the default dtype

    bf16 = torch.bfloat16 if native else torch.float32
    f32 = torch.float32
    assert pick(3, 128, 128) == bf16  # near-square, short side 128
    assert pick(3, 128, 191) == bf16  # aspect < 1.5
    assert pick(3, 384, 384) == bf16
    assert pick(3, 127, 127) == f32  # below BF16_CPU_MIN
    long_bf16 = torch.bfloat16 if amx else torch.float32
    assert pick(3, 128, 192) == long_bf16  # elongated: AMX only (round 12)
    assert pick(3, 1536, 384) == long_bf16
    assert pick(3, 127, 512) == f32  # short side below BF16_CPU_MIN
    assert pick(3, 128, 128, dtype=torch.float64) == torch.float64

    def run(choice: str, out: int) -> torch.Tensor:
        torch.manual_seed(0)
        lin = nn.Linear(128, out, dtype=torch.float32)
        opt = SLNB(lin.parameters(), model=lin, preset="whitened", orth_dtype=choice)
        x = torch.randn(64, 128, dtype=torch.float32)
        lin(x).pow(2).mean().backward()
        opt.step()
        return lin.weight.detach()

    for out, want in ((128, bf16), (344, long_bf16)):
        assert torch.equal(run("auto", out), run(str(want).removeprefix("torch."), out))


def _stack_with_roots(shape: tuple[int, int, int], seed: int):
    """A random float64 stack ``M`` ``(L, out, in)``, damped inverse roots of SPD covariances,
    and ``C⁻¹`` (their squares)."""
    torch.manual_seed(seed)
    m = torch.randn(*shape, dtype=D)
    roots = torch.stack([W.inverse_root_eigh(W.damp(_spd(shape[2], i), 0.1))[0]
                         for i in range(shape[0])])
    return m, roots, roots @ roots


@pytest.mark.parametrize("shape", [(3, 6, 13), (3, 13, 6), (2, 9, 9)])
def test_whitened_orth_gram_is_the_same_map(shape: tuple[int, int, int]) -> None:
    """Newton-Schulz on the short side's Gram matrix equals the iteration on ``M C^{-1/2}``
    (dense float64, wide, tall and square). In float32 it stays within 2e-3 of it (forming
    the Gram matrix squares the condition number: up to 6e-4 over 20 seeds of these shapes,
    against bfloat16's 2e-2, the precision Muon runs at)."""
    m, roots, inv = _stack_with_roots(shape, seed=0)
    want = W.whitened_orth(m, roots)
    torch.testing.assert_close(W.whitened_orth_gram(m, roots, inv), want, rtol=1e-10,
                               atol=1e-12)
    got32 = W.whitened_orth_gram(m.float(), roots.float(), inv.float()).double()
    assert float((got32 - want).norm() / want.norm()) < 2e-3
    if shape[1] <= shape[2]:
        with pytest.raises(ValueError, match="needs c_inv"):
            W.whitened_orth_gram(m, roots)


@pytest.mark.parametrize("shape", [(3, 6, 13), (3, 13, 6), (2, 9, 9)])
def test_the_spectral_gram_form_is_the_same_map(shape: tuple[int, int, int]) -> None:
    """``Q`` from the Gram matrix's eigendecomposition (each eigenvalue iterated as a scalar)
    equals the iterated ``Q`` and the direct iteration on ``M C^{-1/2}`` (dense float64; wide,
    tall and square, the square one through ``C⁻¹``), and float32 stays within 2e-3."""
    m, roots, inv = _stack_with_roots(shape, seed=1)
    want = W.whitened_orth(m, roots)
    got = W.whitened_orth_gram(m, roots, inv, spectral=True)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    x = m @ roots
    s = x @ x.mT if shape[1] <= shape[2] else x.mT @ x
    s = s / torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)[:, None, None]
    for steps in (0, 1, 5):
        q_it, n_it = W.gram_ns5_factor(s, steps)
        q_sp, n_sp = W.gram_ns5_factor(s, steps, spectral=True)
        torch.testing.assert_close(q_sp, q_it, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(n_sp, n_it, rtol=1e-9, atol=1e-12)
    got32 = W.whitened_orth_gram(m.float(), roots.float(), inv.float(), spectral=True)
    assert float((got32.double() - want).norm() / want.norm()) < 2e-3
    bad = m.clone()
    bad[0, 0, 0] = float("nan")  # a step that will be skipped: no LAPACK error, no hang
    W.whitened_orth_gram(bad, roots, inv, spectral=True)


def _steps_match_the_dense_definition(lin, opt, steps: int, rows: int,
                                      spread: tuple[float, float], every: int,
                                      widths: tuple[int, ...] = ()) -> None:
    """Train a float64 ``Linear`` (``lr=1e-2``, no momentum or decay, roots refreshed every
    ``every`` steps) and check each step against the dense ``orth(G C^{-1/2}) C^{-1/2}``; with
    ``widths``, ``C`` is the covariance's block diagonal (blocks of those widths, zero
    elsewhere), and its saved blocks are checked too."""
    d = lin.in_features
    cov = torch.zeros(d, d, dtype=D)
    mask = torch.block_diag(*[torch.ones(w, w, dtype=D) for w in widths]) if widths else 1.0
    for step in range(steps):
        x = torch.randn(rows, d, dtype=D) * torch.linspace(*spread, d, dtype=D) + step
        w0 = lin.weight.detach().clone()
        lin(x).pow(3).mean().backward()
        g = lin.weight.grad.clone()
        opt.step()
        opt.zero_grad()
        mu = x.mean(0)
        cov = 0.95 * cov + 0.05 * (x.T @ x / rows - torch.outer(mu, mu)) * mask
        if step % every == 0:
            root = _dense_inv_sqrt(W.damp(cov / (1 - 0.95 ** (step + 1)), 0.1))
        u = W.whitened_orth(g, root) * 0.2 * max(lin.weight.shape) ** 0.5
        torch.testing.assert_close(lin.weight.detach(), w0 - 1e-2 * u, rtol=1e-6, atol=1e-9)
        if widths:
            saved = opt.state[lin.weight]["input_cov"]
            assert saved.shape == (len(widths), max(widths), max(widths))
            lo = 0
            for k, w in enumerate(widths):
                torch.testing.assert_close(saved[k, :w, :w], cov[lo:lo + w, lo:lo + w])
                assert not saved[k, w:].any() and not saved[k, :, w:].any()  # the padding
                lo += w


def test_block_shape_splits_evenly_and_times_blocks_is_the_block_diagonal_product() -> None:
    assert W.block_shape(1024, 1024) == (1, 1024)
    assert W.block_shape(1536, 1024) == (2, 768)
    assert W.block_shape(3072, 1024) == (3, 1024)
    assert W.block_shape(11008, 1024) == (11, 1001)  # 11 x 1001 = 11011: the last padded
    assert W.block_shape(5000, 0) == (1, 5000)
    blocks = torch.randn(2, 3, 4, 4, dtype=D)  # 2 layers, 3 blocks of 4, for 10 features
    m = torch.randn(2, 5, 10, dtype=D)
    for i in range(2):
        dense = torch.block_diag(*blocks[i])[:10, :10]
        torch.testing.assert_close(W.times_blocks(m, blocks)[i], m[i] @ dense)
    whole = torch.randn(2, 10, 10, dtype=D)
    assert torch.equal(W.times_blocks(m, whole), m @ whole)  # (L, d, d): the plain product


@pytest.mark.parametrize("shape,max_block,widths", [
    ((4, 12), 5, (4, 4, 4)),  # wide: the Gram form with C^-1's blocks
    ((40, 13), 5, (5, 5, 3)),  # tall (aspect 3): the Gram form, the last block padded
    ((16, 13), 5, (5, 5, 3)),  # tall, aspect < 1.5: the direct iteration
    ((9, 9), 4, (3, 3, 3)),  # square: the direct iteration
])
def test_an_input_wider_than_max_block_is_whitened_in_diagonal_blocks(shape, max_block, widths
                                                                      ) -> None:
    """``max_block``: every step equals the dense ``orth(G C^{-1/2}) C^{-1/2}`` with ``C`` the
    block diagonal of the layer's covariance (float64, across refreshes, one ridge for the whole
    layer), whichever form orthogonalises it; the saved covariance is those blocks."""
    from torch import nn

    from hf_slnb import SLNB

    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0]).double()
    opt = SLNB(lin.parameters(), model=lin, preset="whitened", cov_every=1, momentum=0.0,
               weight_decay=0.0, lr=1e-3, whiten_every=2, max_block=max_block)
    _steps_match_the_dense_definition(lin, opt, steps=4, rows=60, spread=(0.3, 3.0), every=2,
                                      widths=widths)


def test_square_layers_take_the_spectral_form_on_the_cpu(monkeypatch) -> None:
    """On the CPU a layer whose short side reaches ``SPECTRAL_MIN`` (lowered here to 4) takes
    the spectral Gram form, square ones too, and every step equals the dense definition."""
    from torch import nn

    from hf_slnb import SLNB
    from hf_slnb import directions as Dn

    assert Dn.SPECTRAL_MIN == 192
    monkeypatch.setattr(Dn, "SPECTRAL_MIN", 4)
    calls = []
    real = W.whitened_orth_gram

    def spy(*args, **kwargs):
        calls.append((tuple(args[0].shape), kwargs.get("spectral")))
        return real(*args, **kwargs)

    monkeypatch.setattr(W, "whitened_orth_gram", spy)
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    opt = SLNB(lin.parameters(), model=lin, preset="whitened", cov_every=1, momentum=0.0,
               weight_decay=0.0, lr=1e-3, whiten_every=1)
    _steps_match_the_dense_definition(lin, opt, steps=2, rows=30, spread=(0.5, 2.0), every=1)
    assert calls == [((1, 6, 6), True)] * 2


def test_a_non_finite_step_through_the_spectral_form_changes_nothing(monkeypatch) -> None:
    """A NaN gradient with the spectral form in use (threshold lowered to 4): parameters and
    every state tensor stay bit for bit, the step is counted as skipped, the next one runs."""
    from torch import nn

    from hf_slnb import SLNB
    from hf_slnb import directions as Dn

    monkeypatch.setattr(Dn, "SPECTRAL_MIN", 4)
    calls = []
    real = W.whitened_orth_gram

    def spy(*args, **kwargs):
        calls.append(kwargs.get("spectral"))
        return real(*args, **kwargs)

    monkeypatch.setattr(W, "whitened_orth_gram", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    opt = SLNB(model.parameters(), model=model, preset="whitened", whiten_every=1)
    x = torch.randn(7, 5, dtype=D)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    assert True in calls  # the (6, 6) bank and the (6, 5) layer; the (2, 6) one iterates
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    model(x).sum().backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"skipped a step: non-finite values in 2\.weight"):
        opt.step()
    opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for p, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, state[id(p)][k]), k
    model(x).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(params[2], model[2].weight)


def test_the_gram_form_serves_long_layers_and_its_inverse_follows_the_refresh() -> None:
    """The class takes the Gram form for a (4, 12) layer and caches ``C⁻¹`` until a refresh
    writes new roots; every step still equals the dense definition (float64)."""
    from torch import nn

    from hf_slnb import SLNB
    from hf_slnb import directions as Dn

    torch.manual_seed(0)
    lin = nn.Linear(12, 4).double()
    opt = SLNB(lin.parameters(), model=lin, preset="whitened", cov_every=1, momentum=0.0,
               weight_decay=0.0, lr=1e-3, whiten_every=2)
    calls = []
    real = W.whitened_orth_gram

    def spy(*args, **kwargs):
        calls.append(args[2] is not None)
        return real(*args, **kwargs)

    W.whitened_orth_gram = spy
    try:
        _steps_match_the_dense_definition(lin, opt, steps=3, rows=40, spread=(0.3, 3.0), every=2)
    finally:
        W.whitened_orth_gram = real
    assert calls == [True, True, True]
    assert Dn.GRAM_ASPECT == 1.5


class _MLPBlock(torch.nn.Module):
    """An FFN block: a tall (16, 6) layer, a wide (6, 16) one (the Gram form with its cached
    ``C⁻¹``) and a square (6, 6) one (the direct iteration)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.mix = (torch.nn.Linear(6, 16), torch.nn.Linear(16, 6),
                                        torch.nn.Linear(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(self.down(torch.tanh(self.up(x))))


@pytest.mark.parametrize("dtype,max_block,cov_every", [
    (torch.float32, 1024, 1), (torch.float64, 1024, 1), (torch.float32, 5, 1),
    (torch.float32, 1024, 3), (torch.float64, 5, 3)])
def test_whitened_resumes_exactly_across_a_refresh(dtype: torch.dtype, max_block: int,
                                                   cov_every: int) -> None:
    """Save after 4 steps, load into a fresh optimizer, go on for 4 steps (a refresh of the
    roots at step 6 in between, ``whiten_every=3``): the parameters equal, bit for bit, those of
    the run that never stopped. The cached ``C⁻¹`` is rebuilt from the loaded roots. With
    ``max_block=5`` every layer keeps blocks (6 features: 2 of 3; 16: 4 of 4), and an optimizer
    built with another ``max_block`` refuses the checkpoint, naming it. With ``cov_every=3``
    the covariances update at steps 0, 3 and 6 (a refresh at each): the resumed optimizer
    takes its count of steps from the checkpoint, so it captures at step 6, not at its own
    fourth."""
    import copy

    from hf_slnb import SLNB

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.ModuleList([_MLPBlock(), _MLPBlock()]))

    def run(net: torch.nn.Module, opt: object, steps: range) -> None:
        for step in steps:
            g = torch.Generator().manual_seed(step)
            x = (torch.randn(40, 6, generator=g) * torch.linspace(0.3, 3.0, 6) + 0.5).to(dtype)
            for block in net[0]:
                x = block(x)
            x.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    options = {"preset": "whitened", "whiten_every": 3, "cov_rows": 24, "lr": 1e-2,
               "max_block": max_block, "cov_every": cov_every}
    net = make().to(dtype)
    opt = SLNB(net.parameters(), model=net, **options)
    run(net, opt, range(4))
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    run(net, opt, range(4, 8))

    other = make().to(dtype)
    other.load_state_dict(saved_net)
    fresh = SLNB(other.parameters(), model=other, **options)
    fresh.load_state_dict(saved_opt)
    assert fresh.steps_taken == 4
    run(other, fresh, range(4, 8))
    for (name, a), b in zip(net.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
    root = fresh.state[other[0][0].down.weight]["input_inv_sqrt"]
    assert root.shape == ((16, 16) if max_block == 1024 else (4, 4, 4))
    third = make().to(dtype)
    wrong = SLNB(third.parameters(), model=third, **{**options, "max_block": 8})
    with pytest.raises(ValueError, match=r"'input_cov' for parameter .* has shape .*max_block=8"):
        wrong.load_state_dict(saved_opt)


@pytest.mark.parametrize("chunk_layers", [1, 2, 3])
def test_a_bank_updates_its_covariances_in_chunks_of_layers(monkeypatch, chunk_layers) -> None:
    """Three same-shape layers (one bank) with the covariance update batched in chunks of 1, 2
    (2 + 1) or 3 layers: every layer's step equals the dense ``orth(G C^{-1/2}) C^{-1/2}`` with
    its own input covariance, across a refresh, and so does its saved covariance."""
    from torch import nn

    from hf_slnb import SLNB
    from hf_slnb import directions as Dn

    d = 5
    monkeypatch.setattr(Dn, "COV_CHUNK_BYTES", chunk_layers * d * d * 8)
    assert Dn.layer_chunks(3, d, 8) == [slice(lo, min(3, lo + chunk_layers))
                                        for lo in range(0, 3, chunk_layers)]
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(d, d) for _ in range(3)).double()
    opt = SLNB(layers.parameters(), model=layers, preset="whitened", cov_every=1, momentum=0.0,
               weight_decay=0.0, lr=1e-3, whiten_every=2)
    covs = [torch.zeros(d, d, dtype=D) for _ in layers]
    roots = list(covs)
    for step in range(3):
        xs = [torch.randn(30, d, dtype=D) * torch.linspace(0.3, 3.0, d, dtype=D) * (i + 1) + step
              for i in range(3)]
        w0 = [lin.weight.detach().clone() for lin in layers]
        sum(lin(x).pow(3).mean() for lin, x in zip(layers, xs)).backward()
        grads = [lin.weight.grad.clone() for lin in layers]
        opt.step()
        opt.zero_grad()
        for i, (lin, x) in enumerate(zip(layers, xs)):
            mu = x.mean(0)
            covs[i] = 0.95 * covs[i] + 0.05 * (x.T @ x / 30 - torch.outer(mu, mu))
            if step % 2 == 0:  # a refresh: the root of the bias-corrected, damped EMA
                roots[i] = _dense_inv_sqrt(W.damp(covs[i] / (1 - 0.95 ** (step + 1)), 0.1))
            u = W.whitened_orth(grads[i], roots[i]) * 0.2 * d ** 0.5
            torch.testing.assert_close(lin.weight.detach(), w0[i] - 1e-2 * u,
                                       rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(opt.state[lin.weight]["input_cov"], covs[i])


def test_a_layer_fed_by_a_layernorm_is_orthogonalised_stably_in_float32() -> None:
    """A tall float32 layer whose inputs come out of a LayerNorm (they lie in a hyperplane, so
    ``M C^{-1/2}`` has a null direction): its step has the float64 definition's direction to
    1e-3 (2e-4 measured) and its size to 1%. The Gram matrix's eigenvalue there is float32
    rounding (``eps ‖S‖``, not ``σ²``), which the size ``Σ λ t(λ)²`` counts about 500²-fold:
    0.4% here, one direction of eight. Newton-Schulz iterated on the Gram matrix's polynomial (the class's
    form before) grew that much along it, and rounding leaked into the direction: 20% off."""
    from torch import nn

    from hf_slnb import SLNB

    torch.manual_seed(0)
    f32 = torch.float32  # whatever the default dtype (test_semantics sets float64)
    lin = nn.Linear(8, 300, dtype=f32)
    opt = SLNB(lin.parameters(), model=lin, preset="whitened", momentum=0.0, weight_decay=0.0,
               lr=1e-3, whiten_every=1)
    x = torch.randn(64, 8, dtype=f32) * torch.linspace(0.5, 2.0, 8, dtype=f32)
    x = torch.nn.functional.layer_norm(x, (8,))
    w0 = lin.weight.detach().double()  # a copy: the weight is float32
    lin(x).pow(3).mean().backward()
    g = lin.weight.grad.double()
    opt.step()
    xd = x.double()
    mu = xd.mean(0)
    cov = xd.T @ xd / 64 - torch.outer(mu, mu)  # the EMA after one step, bias-corrected
    assert torch.linalg.eigvalsh(cov)[0].abs() < 1e-12  # the hyperplane's normal: a null
    u = W.whitened_orth(g, _dense_inv_sqrt(W.damp(cov, 0.1))) * 0.2 * 300 ** 0.5
    step = (w0 - lin.weight.detach().double()) / 1e-2
    unit = step / step.norm()
    assert float((unit - u / u.norm()).norm()) < 1e-3, float((unit - u / u.norm()).norm())
    assert abs(float(step.norm() / u.norm()) - 1) < 1e-2, float(step.norm() / u.norm())


def test_cov_every_updates_the_covariance_in_one_step_of_k() -> None:
    """``cov_every=2``: the inputs of steps 0, 2 and 4 enter the covariance EMA (one update
    each, bias-corrected by the updates' count) and the root is refreshed at each
    (``whiten_every=2``: every update); steps 1 and 3 capture nothing (no hook work, no
    warning) and orthogonalise with the root as it stands. The stored covariance, the root and
    each step's weight update equal a dense float64 computation, ``orth(G R) R`` at Muon's
    size with ``R`` the inverse root of the damped covariance; the head beside the block, which
    takes Adam's step, never captures."""
    import warnings

    from torch import nn

    from hf_slnb import SLNB

    torch.manual_seed(0)
    net = nn.Sequential(nn.ModuleList([nn.Linear(4, 3)]), nn.Linear(3, 2)).double()
    lin, head = net[0][0], net[1]
    opt = SLNB(net.parameters(), model=net, preset="whitened", cov_every=2, whiten_every=2,
               momentum=0.0, weight_decay=0.0, lr=1e-3)
    cov, updates, root = torch.zeros(4, 4, dtype=D), 0, torch.eye(4, dtype=D)
    for step in range(5):
        x = torch.randn(30, 4, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=D) + step
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            head(lin(x)).pow(2).mean().backward()
            captured = {n.name: n.capture is not None for n in opt.neurons}
            assert captured == {"0.0": step % 2 == 0, "1": False}, step
            before, g = lin.weight.detach().clone(), lin.weight.grad.clone()
            opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            m = x.mean(0)
            cov = 0.95 * cov + 0.05 * (x.T @ x / 30 - torch.outer(m, m))
            updates += 1
            damped = cov / (1 - 0.95 ** updates)
            damped = damped + 0.1 * torch.trace(damped) / 4 * torch.eye(4, dtype=D)
            root = _dense_inv_sqrt(damped)
        o = W.orthogonalize_ns5(g @ root)
        u = o @ root
        u = u * torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(u) * 0.2 * 2.0
        torch.testing.assert_close(lin.weight.detach(), before - 1e-2 * u, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(opt.state[lin.weight]["input_cov"], cov, rtol=1e-9,
                                   atol=1e-12)
        _assert_whitens(opt.state[lin.weight]["input_inv_sqrt"], damped)
    assert opt.steps_taken == 5
    opt.remove_hooks()
    # No root older than whiten_every steps: refreshes every floor(whiten_every / cov_every)
    # updates, at least every update.
    for whiten_every, cov_every, updates in ((10, 1, 10), (10, 3, 3), (10, 4, 2), (2, 3, 1),
                                             (12, 4, 3)):
        other = SLNB(net.parameters(), model=net, preset="whitened", whiten_every=whiten_every,
                     cov_every=cov_every)
        assert other.direction.refresh_every == updates
        other.remove_hooks()
    with pytest.raises(ValueError, match=r"Invalid cov_every=0: must be an integer >= 1"):
        SLNB(net.parameters(), model=net, preset="whitened", cov_every=0)
    with pytest.warns(UserWarning, match=r"cov_every=2 \(only direction='whitened_orth' keeps"):
        SLNB(net.parameters(), model=net, preset="graft", cov_every=2)


def test_an_orthogonalised_layer_without_input_keeps_its_whitening_and_no_adam_moment() -> None:
    """A layer that ``whitened`` orthogonalises takes its orthogonalised step on every step:
    on a step where its input is not seen (used functionally) it takes ``orth(G R) R`` at
    Muon's size with its root ``R`` as it stands, its covariance unchanged, while the layer of
    its bank that did see input updates its own. Adam's second moment is not kept for those
    weights (they have no ``exp_avg_sq``); the biases keep Adam's, ``v = (1 - b2) g²`` on
    the first step. Dense float64 check."""
    from torch import nn
    from torch.nn import functional as F

    from hf_slnb import SLNB

    torch.manual_seed(0)
    net = nn.Sequential(nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])).double()
    a, b = net[0]
    opt = SLNB(net.parameters(), model=net, preset="whitened", cov_every=1, whiten_every=1,
               momentum=0.0, weight_decay=0.0, lr=1e-3)
    covs = {id(a): torch.zeros(4, 4, dtype=D), id(b): torch.zeros(4, 4, dtype=D)}
    roots = {id(a): torch.eye(4, dtype=D), id(b): torch.eye(4, dtype=D)}
    for step in range(3):
        x = torch.randn(30, 4, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=D) + step
        functional = step == 1  # b's input unseen on the second step
        out_b = F.linear(x, b.weight, b.bias) if functional else b(x)
        (a(x).pow(2).mean() + out_b.sin().mean()).backward()
        before = {id(m): m.weight.detach().clone() for m in (a, b)}
        grads = {id(m): m.weight.grad.clone() for m in (a, b)}
        bias_grad = b.bias.grad.clone()
        if functional:
            with pytest.warns(UserWarning, match=r"layer '0.1' got a gradient but SLNB never saw "
                              r"its input .*it is orthogonalised with its input whitening as it "
                              r"stands"):
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
        for m in (a, b):
            if m is a or not functional:
                mean = x.mean(0)
                covs[id(m)] = 0.95 * covs[id(m)] + 0.05 * (x.T @ x / 30 - torch.outer(mean, mean))
                seen = 2 if step == 2 and m is b else step + 1  # updates so far
                damped = covs[id(m)] / (1 - 0.95 ** seen)
                damped = damped + 0.1 * torch.trace(damped) / 4 * torch.eye(4, dtype=D)
                roots[id(m)] = _dense_inv_sqrt(damped)
            r, g = roots[id(m)], grads[id(m)]
            o = W.orthogonalize_ns5(g @ r)
            u = o @ r
            u = u * torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(u) * 0.2 * 2.0
            torch.testing.assert_close(m.weight.detach(), before[id(m)] - 1e-2 * u, rtol=1e-9,
                                       atol=1e-12)
            torch.testing.assert_close(opt.state[m.weight]["input_cov"], covs[id(m)],
                                       rtol=1e-9, atol=1e-12)
            assert "exp_avg_sq" not in opt.state[m.weight]
        if step == 0:
            torch.testing.assert_close(opt.state[b.bias]["exp_avg_sq"], 0.001 * bias_grad ** 2,
                                       rtol=1e-12, atol=0)
    opt.remove_hooks()


def test_the_bfloat16_roots_follow_every_refresh_and_load(monkeypatch) -> None:
    """With ``orth_dtype='bfloat16'`` the CPU casts the roots once per refresh (cached by their
    version counter): every step's whitening reads the roots as they stand, cast, across
    refreshes (``whiten_every=2``) and after a checkpoint is loaded into a fresh optimizer.
    The cache is held on the CPU only."""
    from torch import nn

    from hf_slnb import SLNB

    seen = []
    whitened_orth = W.whitened_orth

    def spy(m, c_inv_sqrt, *args, **kwargs):
        seen.append(c_inv_sqrt.clone())
        return whitened_orth(m, c_inv_sqrt, *args, **kwargs)

    monkeypatch.setattr(W, "whitened_orth", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.ModuleList([nn.Linear(6, 6)])).float()
    lin = net[0][0]

    def run(opt, steps):
        for step in range(steps):
            x = torch.randn(40, 6, dtype=torch.float32) * (1 + step)
            lin(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            expected = opt.state[lin.weight]["input_inv_sqrt"].to(torch.bfloat16)
            assert torch.equal(seen[-1][0], expected), step

    opt = SLNB(net.parameters(), model=net, preset="whitened", orth_dtype="bfloat16",
               cov_every=1, whiten_every=2)
    run(opt, 5)
    assert len({t.float().sum().item() for t in seen}) >= 3  # the roots changed
    state = opt.state_dict()
    opt.remove_hooks()
    fresh = SLNB(net.parameters(), model=net, preset="whitened", orth_dtype="bfloat16",
                 cov_every=1, whiten_every=2)
    fresh.load_state_dict(state)
    seen.clear()
    run(fresh, 2)
    assert all(getattr(b, "root_cast", None) is not None for b in fresh.banks)
    fresh.remove_hooks()


class _TwinBlock(torch.nn.Module):
    """q and k read one input; o, of their shape, reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = (torch.nn.Linear(5, 5) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(torch.tanh(self.q(x) * self.k(x)))


def test_layers_reading_one_input_share_one_decomposition(monkeypatch) -> None:
    """q and k read one input, so their covariances are equal bit for bit: the CPU refresh
    factorises each such run of layers once (2 matrices per block, not 3), and every layer's
    factor still whitens its own damped covariance."""
    from hf_slnb import SLNB

    sizes = []
    factor = W.whitener_cholesky
    monkeypatch.setattr(W, "whitener_cholesky", lambda c: sizes.append(len(c)) or factor(c))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.ModuleList([_TwinBlock(), _TwinBlock()])).double()
    opt = SLNB(net.parameters(), model=net, preset="whitened", whiten_every=1, cov_every=1)
    for step in range(3):
        x = torch.randn(20, 5, dtype=D) * torch.linspace(0.5, 2.0, 5, dtype=D) + step
        for block in net[0]:
            x = block(x)
        x.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert sizes == [4, 4, 4]  # one bank of 6 layers: q/k once, o once, per block
    for block in net[0]:
        for layer in (block.q, block.k, block.o):
            state = opt.state[layer.weight]
            c = state["input_cov"] / (1 - 0.95 ** 3)
            c = c + 0.1 * torch.trace(c) / 5 * torch.eye(5, dtype=D)
            _assert_whitens(state["input_inv_sqrt"], c)
        assert torch.equal(opt.state[block.q.weight]["input_cov"],
                           opt.state[block.k.weight]["input_cov"])


def test_whitened_keeps_no_adam_moment_for_its_orthogonalised_weights() -> None:
    """Under ``whitened`` the orthogonalised weights hold no ``exp_avg_sq`` (the arenas'
    buffer covers the other parameters only: the memory AdamW's ``v`` would take for them is
    not allocated), and every other parameter takes Adam's step with its own ``v``, equal to a
    dense Adam run over three steps (momentum 0.9). A checkpoint of an older round, which held
    an ``exp_avg_sq`` for those weights, loads: the entry is dropped, and the run goes on bit
    for bit as from the checkpoint without it."""
    import copy

    from hf_slnb import SLNB

    torch.manual_seed(0)
    net = _Classifier().double()
    options = {"preset": "whitened", "momentum": 0.9, "weight_decay": 0.0, "lr": 1e-3}
    opt = SLNB(net.parameters(), model=net, **options)
    params = dict(net.named_parameters())
    orth = {"blocks.0.fc.weight", "blocks.1.fc.weight"}
    b2, eps, lr = opt.config.norm_decay, opt.config.eps, 1e-3 * opt.config.lr_scale
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    expected = {n: p.detach().clone() for n, p in params.items()}

    def run(net: torch.nn.Module, opt: object, steps: range, dense: bool = False) -> None:
        for step in steps:
            g = torch.Generator().manual_seed(step)
            x = torch.randn(30, 5, generator=g, dtype=D) * 2.0 + 0.7
            torch.nn.functional.cross_entropy(net(x), torch.arange(30) % 2).backward()
            for n, p in net.named_parameters() if dense else ():
                m[n] = 0.9 * m[n] + 0.1 * p.grad
                v[n] = b2 * v[n] + (1 - b2) * p.grad ** 2
                t = step + 1
                adam = (m[n] / (1 - 0.9 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + eps)
                expected[n] = expected[n] - lr * adam
            opt.step()
            opt.zero_grad()

    run(net, opt, range(3), dense=True)
    for n, p in params.items():
        if n in orth:
            assert "exp_avg_sq" not in opt.state[p], n
            continue
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v[n], rtol=1e-12, atol=0)
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-14)
    held = sum(a.buffers["exp_avg_sq"].numel() for a in opt._arenas)
    assert held == sum(p.numel() for n, p in params.items() if n not in orth)

    saved_net, saved = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(saved)  # an older round's checkpoint: v kept for every parameter
    for i, (n, p) in enumerate(params.items()):
        if n in orth:
            old["state"][i]["exp_avg_sq"] = torch.rand_like(p)
    copies = []
    for state in (saved, old):
        other = _Classifier().double()
        other.load_state_dict(saved_net)
        resumed = SLNB(other.parameters(), model=other, **options)
        resumed.load_state_dict(state)
        run(other, resumed, range(3, 5))
        for n, p in other.named_parameters():
            assert ("exp_avg_sq" in resumed.state[p]) == (n not in orth), n
        assert all("exp_avg_sq" not in resumed.state_dict()["state"][i]
                   for i, n in enumerate(params) if n in orth)
        copies.append(other)
    run(net, opt, range(3, 5))
    for (n, a), b, c in zip(net.named_parameters(), copies[0].parameters(),
                            copies[1].parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), n


def test_rest_lr_scale_steps_the_parameters_left_to_adam_apart() -> None:
    """``rest_lr_scale`` under ``whitened``: the parameters it does not orthogonalise (the
    pooler, the classifier, every bias) take Adam's step, weight decay included, at
    ``rest_lr_scale * lr_scale * lr``; the orthogonalised weights are bit for bit those of a run
    without it. A checkpoint made with another value is refused, naming it; under ``graft`` it
    is an option without effect, and says so. Dense check of the first step (momentum 0: Adam's
    direction is ``g / (|g| + eps)``)."""
    import copy

    from hf_slnb import SLNB

    def one_step(net: torch.nn.Module, **options: object) -> tuple[object, dict, dict]:
        x = torch.linspace(-1.0, 2.0, 150, dtype=D).reshape(30, 5) ** 3 + 0.7
        opt = SLNB(net.parameters(), model=net, preset="whitened", momentum=0.0,
                   weight_decay=0.5, lr=1e-3, **options)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        torch.nn.functional.cross_entropy(net(x), torch.arange(30) % 2).backward()
        grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        opt.step()
        return opt, before, grads

    torch.manual_seed(0)
    net = _Classifier().double()
    twin = copy.deepcopy(net)
    opt, before, grads = one_step(net, rest_lr_scale=0.1)
    base, _, _ = one_step(twin)
    orth = {"blocks.0.fc.weight", "blocks.1.fc.weight"}
    step = 1e-3 * 10 * 0.1  # lr * lr_scale * rest_lr_scale
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        if name in orth:
            assert torch.equal(p, q), name
            continue
        adam = grads[name] / (grads[name].abs() + 1e-8)
        expected = before[name] * (1 - step * 0.5) - step * adam
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
        assert not torch.allclose(p, q), name
    saved = opt.state_dict()
    fresh = _Classifier().double()
    other = SLNB(fresh.parameters(), model=fresh, preset="whitened")
    with pytest.raises(ValueError, match=r"rest_lr_scale: checkpoint 0\.1, this optimizer 1\.0"):
        other.load_state_dict(saved)
    with pytest.warns(UserWarning, match=r"no effect: rest_lr_scale=0\.1 \(only an "
                                         r"orthogonalising direction"):
        SLNB(fresh.parameters(), model=fresh, preset="graft", rest_lr_scale=0.1).remove_hooks()
    for o in (opt, base, other):
        o.remove_hooks()


def test_an_orthogonalised_step_above_0_1_is_warned_about() -> None:
    """``whitened`` at an lr whose step ``lr_scale * lr`` is above 0.1 (lr 3e-2: four of 21
    architectures learned little, lr 1e-1: most diverged) says so, naming the lr, the step and
    the lr to start from, at construction and for a group added later; up to 0.1 it is silent,
    and ``graft`` (no orthogonalised step) never warns."""
    import warnings

    from hf_slnb import SLNB

    net = _Classifier()
    with pytest.warns(UserWarning, match=r"lr=0\.03 in parameter group 0 steps at lr_scale \* lr"
                                         r" = 0\.3\. .*start SLNB at lr=1e-3"):
        SLNB(net.parameters(), model=net, preset="whitened", lr=3e-2).remove_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SLNB(net.parameters(), model=net, preset="whitened", lr=1e-2).remove_hooks()
        SLNB(net.parameters(), model=net, preset="graft", lr=0.5).remove_hooks()
        opt = SLNB(net.blocks.parameters(), model=net, preset="whitened", lr=1e-3)
    with pytest.warns(UserWarning, match=r"lr=0\.05 in parameter group 1 steps at lr_scale \* lr"
                                         r" = 0\.5"):
        opt.add_param_group({"params": list(net.classifier.parameters()), "lr": 5e-2})
    opt.remove_hooks()


def test_a_layer_fed_zeros_keeps_its_whitening_factor() -> None:
    """A layer whose inputs are all zero has a zero covariance, which no factor whitens: the
    CPU's refresh keeps the factor it had (the identity at first) instead of a non-finite one,
    and the next refresh with input whitens as usual."""
    from hf_slnb import SLNB

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4)])).double()
    lin = net[0][0]
    opt = SLNB(net.parameters(), model=net, preset="whitened", whiten_every=1, cov_every=1)
    lin(torch.zeros(10, 4, dtype=D)).pow(2).sum().add(lin.bias.sum()).backward()
    opt.step()
    opt.zero_grad()
    assert torch.equal(opt.state[lin.weight]["input_inv_sqrt"], torch.eye(4, dtype=D))
    assert all(bool(p.isfinite().all()) for p in net.parameters())
    x = torch.randn(30, 4, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=D)
    lin(x).pow(2).mean().backward()
    opt.step()
    m = x.mean(0)
    cov = 0.05 * (x.T @ x / 30 - torch.outer(m, m)) / (1 - 0.95 ** 2)
    _assert_whitens(opt.state[lin.weight]["input_inv_sqrt"], W.damp(cov, 0.1))
    assert all(bool(p.isfinite().all()) for p in net.parameters())
