"""Number-for-number tests: the dense reference against itself, and ``hf_slnb.SLNB`` against it."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

try:
    from reference_slnb import ReferenceSLNB
except ImportError:  # tests/ imported as a package
    from tests.reference_slnb import ReferenceSLNB

F64 = torch.float64
REL_TOL = 1e-9
N_STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny float64 ops: intra-op threading only adds overhead (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- models and data
class _EmbedHead(nn.Module):
    """Embedding followed by a linear head (cross-entropy over the vocabulary)."""

    def __init__(self, vocab: int = 20, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


class _Branchy(nn.Module):
    """Data-dependent routing: ``b`` sometimes gets no gradient at all (per-parameter step
    counts); ``c`` is sometimes applied functionally, so its weight gets a gradient without a
    captured input (identity metric for that step, or only part of the micro-batches count)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)
        self.c = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if x[0, 0] > 0:
            out = self.c(h)
        else:
            out = nn.functional.linear(h, self.c.weight, self.c.bias)
        if x[0, 2] > 0:
            out = out + self.b(h)
        return out


def _frozen_bias_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)
    return model


def _hf_conv1d_model() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return nn.Sequential(Conv1D(8, 5), nn.Tanh(), Conv1D(3, 8))


def _gpt2_model() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@dataclass
class Case:
    """A float64 model, a batch generator (full batch) and a loss."""

    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]


def _xy(xs: tuple[int, ...], ys: tuple[int, ...]) -> Callable[[torch.Generator], Any]:
    def make(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(xs, generator=gen, dtype=F64) * 1.5 + 0.3
        y = torch.randn(ys, generator=gen, dtype=F64)
        return x, y

    return make


def _ids(shape: tuple[int, ...], vocab: int, with_labels: bool) -> Callable[[torch.Generator], Any]:
    def make(gen: torch.Generator) -> Any:
        ids = torch.randint(0, vocab, shape, generator=gen)
        if with_labels:
            return ids, torch.randint(0, vocab, shape, generator=gen)
        return ids

    return make


def _ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, labels = batch
    logits = model(ids)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _gpt2_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


CASES: dict[str, Case] = {
    "linear_bias": Case(
        lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)),
        _xy((4, 3, 5), (4, 3, 3)), _mse,
    ),
    "linear_nobias": Case(
        lambda: nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False)),
        _xy((4, 3, 5), (4, 3, 3)), _mse,
    ),
    "linear_frozen_bias": Case(_frozen_bias_model, _xy((4, 3, 5), (4, 3, 3)), _mse),
    "branchy": Case(_Branchy, _xy((8, 4), (8, 2)), _mse),
    "mlp_layernorm": Case(
        lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)),
        _xy((8, 5), (8, 3)), _mse,
    ),
    "conv1d": Case(
        lambda: nn.Sequential(
            nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), nn.Tanh(),
            nn.Conv1d(4, 6, 3, padding=1, groups=2),
        ),
        _xy((4, 3, 11), (4, 6, 5)), _mse,
    ),
    "conv2d": Case(
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Tanh(),
            nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6, bias=False), nn.Tanh(),
            nn.Conv2d(6, 2, 1),
        ),
        _xy((2, 4, 7, 7), (2, 2, 4, 4)), _mse,
    ),
    "hf_conv1d": Case(_hf_conv1d_model, _xy((4, 3, 5), (4, 3, 3)), _mse),
    "embedding": Case(_EmbedHead, _ids((4, 6), 20, True), _ce_loss),
    "gpt2": Case(_gpt2_model, _ids((2, 8), 50, False), _gpt2_loss),
}


def _groups_two_lr(model: nn.Module) -> list[dict[str, Any]]:
    """Matrices in one group, vectors in another, different lr and weight decay."""
    mats = [p for p in model.parameters() if p.dim() >= 2]
    vecs = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": mats, "lr": 0.1, "weight_decay": 0.1},
        {"params": vecs, "lr": 0.03, "weight_decay": 0.05},
    ]


SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "cg0": {"cg_iters": 0},
    "cg1": {"cg_iters": 1},
    "cg5": {"cg_iters": 5},
    "cg8_tol0.03": {"cg_iters": 8, "cg_tol": 0.03},  # exercises the early stop rule
    "shrink0": {"shrinkage": 0.0},
    "shrink0.5": {"shrinkage": 0.5},
    "ridge1": {"ridge": 1.0},
    "momentum0": {"momentum": 0.0},
    "diagonal_only": {"diagonal_only": True},
    "wd_groups": {"weight_decay": 0.1, "_groups": True},
    "accum2": {"_accum": 2},
    "no_embedding_precond": {"precondition_embeddings": False},
}


def _split(batch: Any, k: int) -> list[Any]:
    """Split a batch along dim 0 into k equal micro-batches."""
    if isinstance(batch, tuple):
        parts = [b.chunk(k, dim=0) for b in batch]
        return [tuple(p[i] for p in parts) for i in range(k)]
    return list(batch.chunk(k, dim=0))


def _make_opt(cls: type, model: nn.Module, setting: dict[str, Any]) -> torch.optim.Optimizer:
    kw = {k: v for k, v in setting.items() if not k.startswith("_")}
    params = _groups_two_lr(model) if setting.get("_groups") else model.parameters()
    return cls(params, model=model, **kw)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, case: Case, batch: Any, k: int) -> None:
    opt.zero_grad(set_to_none=True)
    for micro in _split(batch, k):
        (case.loss(model, micro) / k).backward()
    opt.step()


def _vec(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(F64) for p in model.parameters()])


def _build(case_name: str, seed: int = 0) -> tuple[Case, nn.Module]:
    torch.manual_seed(seed)
    case = CASES[case_name]
    model = case.build().to(F64).train()
    return case, model


def _batches(case: Case, seed: int, n: int = N_STEPS) -> list[Any]:
    gen = torch.Generator().manual_seed(seed)
    return [case.make_batch(gen) for _ in range(n)]


# ---------------------------------------------------------------------------- reference self-checks
def _ref_steps(case_name: str, n_steps: int, **kw: Any) -> tuple[nn.Module, ReferenceSLNB]:
    case, model = _build(case_name)
    opt = ReferenceSLNB(model.parameters(), model=model, **kw)
    for batch in _batches(case, 1, n_steps):
        _train_step(model, opt, case, batch, 1)
    return model, opt


@pytest.mark.parametrize("case_name", ["linear_bias", "conv2d", "hf_conv1d", "embedding"])
def test_reference_cg_converges_to_dense_solve(case_name: str) -> None:
    """With many iterations (and a warm start at step 2) PCG gives linalg.solve(A, g)."""
    _, opt = _ref_steps(case_name, 2, cg_iters=400, cg_tol=1e-13)
    assert opt.last
    for name, d in opt.last.items():
        exact = torch.linalg.solve(d["A"], d["g"])
        err = (d["h"] - exact).norm() / exact.norm()
        assert err < 1e-8, (name, float(err))


def test_reference_diagonal_only_is_P_g() -> None:
    """diagonal_only: h = P g."""
    _, opt = _ref_steps("conv2d", 2, diagonal_only=True)
    for d in opt.last.values():
        torch.testing.assert_close(d["h"], d["P"] @ d["g"], rtol=1e-13, atol=0)


def _feature_and_row_by_loops(neuron: Any) -> tuple[list[int], list[int]]:
    """Independently of the reference: for each flattened weight element (row-major order), the
    input feature it multiplies and the output row (bias) it belongs to."""
    m, w = neuron.module, neuron.weight
    feat: list[int] = []
    row: list[int] = []
    if isinstance(m, nn.Linear):
        for o in range(w.shape[0]):
            for i in range(w.shape[1]):
                feat.append(i)
                row.append(o)
    elif isinstance(m, nn.Embedding):
        for v in range(w.shape[0]):
            for d in range(w.shape[1]):
                feat.append(v)
                row.append(d)
    elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        out, cin_g, taps = w.shape[0], w.shape[1], w[0, 0].numel()
        per_group = out // m.groups
        for o in range(out):
            for c in range(cin_g):
                for _ in range(taps):
                    feat.append((o // per_group) * cin_g + c)
                    row.append(o)
    else:  # HF Conv1D, weight (in, out)
        for i in range(w.shape[0]):
            for o in range(w.shape[1]):
                feat.append(i)
                row.append(o)
    return feat, row


def _block_approximation(neuron: Any, mu: torch.Tensor, var: torch.Tensor,
                         with_bias: bool) -> torch.Tensor:
    """The approximate second moment P claims to invert, element by element with loops.

    Per output row o, over the weight entries e of that row (features f(e)) and its bias:
    [[diag(var_f) + mu_f mu_f^T, mu_f], [mu_f^T, 1]]; without a bias diag(var_f + mu_f^2).
    """
    feat, row = _feature_and_row_by_loops(neuron)
    nw = len(feat)
    nout = max(row) + 1
    size = nw + (nout if with_bias else 0)
    C = torch.zeros(size, size, dtype=F64)
    for e1 in range(nw):
        f1 = feat[e1]
        if not with_bias:
            C[e1, e1] = var[f1] + mu[f1] ** 2
            continue
        o = row[e1]
        C[e1, nw + o] = mu[f1]
        C[nw + o, e1] = mu[f1]
        for e2 in range(nw):
            if row[e2] == o:
                C[e1, e2] = mu[f1] * mu[feat[e2]] + (var[f1] if e1 == e2 else 0.0)
    for o in range(nout if with_bias else 0):
        C[nw + o, nw + o] = 1.0
    return C


@pytest.mark.parametrize("case_name", ["linear_bias", "linear_nobias", "conv1d", "conv2d",
                                       "hf_conv1d", "embedding"])
def test_reference_P_inverts_block_approximation(case_name: str) -> None:
    """The explicit P is the inverse of the diagonal-plus-mean block approximation."""
    _, opt = _ref_steps(case_name, 2)
    for neuron in opt.neurons:
        d = opt.last[neuron.name]
        with_bias = neuron.bias is not None
        C = _block_approximation(neuron, d["mu"], d["var"], with_bias)
        eye = torch.eye(C.shape[0], dtype=F64)
        torch.testing.assert_close(d["P"] @ C, eye, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case_name", ["linear_frozen_bias", "conv1d", "conv2d", "hf_conv1d",
                                       "embedding"])
def test_reference_jacobian_matches_autograd(case_name: str) -> None:
    """The basis-vector Jacobian equals torch.func.jacrev of the layer output."""
    from torch.func import functional_call, jacrev

    case, model = _build(case_name)
    opt = ReferenceSLNB(model.parameters(), model=model)
    for batch in _batches(case, 12, 1):
        opt.zero_grad()
        case.loss(model, batch).backward()
    for neuron in opt.neurons:
        x = neuron.inputs[0]
        with_bias = neuron.bias is not None and neuron.bias.grad is not None
        w = neuron.weight.detach()
        theta = torch.cat([w.reshape(-1)] + ([neuron.bias.detach()] if with_bias else []))

        def f(t: torch.Tensor, m: nn.Module = neuron.module, shape: Any = w.shape,
              nw: int = w.numel(), wb: bool = with_bias, x: torch.Tensor = x) -> torch.Tensor:
            params = {"weight": t[:nw].reshape(shape)}
            if wb:
                params["bias"] = t[nw:]
            return functional_call(m, params, (x,)).reshape(-1)

        opt._suspended = True
        expect = jacrev(f)(theta)
        opt._suspended = False
        got = opt._jacobian(neuron, x, with_bias)
        torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_reference_block_approximation_is_exact_where_it_should_be() -> None:
    """At t=1, shrinkage 0, for a Linear: the approximation matches the exact metric's diagonal
    and bias column (A - ridge D), i.e. it only drops the off-diagonal feature covariances."""
    _, opt = _ref_steps("linear_bias", 1, shrinkage=0.0, ridge=0.3)
    for neuron in opt.neurons:
        d = opt.last[neuron.name]
        nw = neuron.weight.numel()
        C = _block_approximation(neuron, d["mu"], d["var"], True)
        A0 = d["A"].clone()
        A0[range(nw), range(nw)] -= 0.3
        torch.testing.assert_close(torch.diagonal(C), torch.diagonal(A0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(C[:, nw:], A0[:, nw:], rtol=1e-12, atol=1e-14)


def test_reference_metric_closed_form_linear_and_conv() -> None:
    """J^T J / N equals I_out (x) X~^T X~ / N (Linear) and the unfold patch moment (Conv2d)."""
    torch.manual_seed(3)
    lin = nn.Linear(4, 3).to(F64)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(F64)
    model = nn.ModuleDict({"lin": lin, "conv": conv}).train()
    opt = ReferenceSLNB(model.parameters(), model=model, ridge=0.7)
    x = torch.randn(5, 2, 4, dtype=F64)
    xi = torch.randn(2, 2, 6, 6, dtype=F64)
    (lin(x).sin().sum() + conv(xi).cos().sum()).backward()
    opt.step()

    Xt = torch.cat([x.reshape(-1, 4), torch.ones(10, 1, dtype=F64)], dim=1)
    C = Xt.T @ Xt / 10
    A = opt.last["lin"]["A"]
    for o in range(3):
        idx = [o * 4 + i for i in range(4)] + [12 + o]
        expect = C + 0.7 * torch.diag(torch.tensor([1.0] * 4 + [0.0], dtype=F64))
        torch.testing.assert_close(A[idx][:, idx], expect, rtol=1e-12, atol=1e-14)
    mask = torch.ones_like(A, dtype=torch.bool)
    for o in range(3):
        idx = torch.tensor([o * 4 + i for i in range(4)] + [12 + o])
        mask[idx[:, None], idx[None, :]] = False
    assert float(A[mask].abs().max()) == 0.0

    patches = nn.functional.unfold(xi, 3, padding=1, stride=2)  # (B, C*9, L)
    Pm = patches.transpose(1, 2).reshape(-1, 18)
    Pt = torch.cat([Pm, torch.ones(Pm.shape[0], 1, dtype=F64)], dim=1)
    Cc = Pt.T @ Pt / Pm.shape[0]
    Ac = opt.last["conv"]["A"]
    assert int(opt.last["conv"]["N"]) == Pm.shape[0] == 2 * 3 * 3
    for o in range(3):
        idx = [o * 18 + i for i in range(18)] + [54 + o]
        expect = Cc + 0.7 * torch.diag(torch.tensor([1.0] * 18 + [0.0], dtype=F64))
        torch.testing.assert_close(Ac[idx][:, idx], expect, rtol=1e-12, atol=1e-14)


def test_reference_ema_values() -> None:
    """Raw EMAs, step counts and bias-corrected mean/var follow the formulas, computed by hand."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).to(F64)
    emb = nn.Embedding(5, 2).to(F64)
    model = nn.ModuleDict({"lin": lin, "emb": emb}).train()
    bm, bv, s = 0.8, 0.95, 0.25
    opt = ReferenceSLNB(model.parameters(), model=model, mean_decay=bm, sq_mean_decay=bv,
                        shrinkage=s)
    mu_l = torch.zeros(3, dtype=F64)
    nu_l = torch.zeros(3, dtype=F64)
    mu_e = torch.zeros(5, dtype=F64)
    nu_e = torch.zeros(5, dtype=F64)
    gen = torch.Generator().manual_seed(5)
    for t in range(1, 4):
        opt.zero_grad()
        x = torch.randn(6, 3, generator=gen, dtype=F64) + t
        ids = torch.randint(0, 5, (7,), generator=gen)
        (lin(x).pow(2).sum() + emb(ids).pow(3).sum()).backward()
        opt.step()
        mean_x = [sum(float(x[i, j]) for i in range(6)) / 6 for j in range(3)]
        sq_x = [sum(float(x[i, j]) ** 2 for i in range(6)) / 6 for j in range(3)]
        cnt = [sum(1 for v in ids.tolist() if v == k) / 7 for k in range(5)]
        mu_l = bm * mu_l + (1 - bm) * torch.tensor(mean_x, dtype=F64)
        nu_l = bv * nu_l + (1 - bv) * torch.tensor(sq_x, dtype=F64)
        mu_e = bm * mu_e + (1 - bm) * torch.tensor(cnt, dtype=F64)
        nu_e = bv * nu_e + (1 - bv) * torch.tensor(cnt, dtype=F64)
        for w, mu_r, nu_r, key in ((lin.weight, mu_l, nu_l, "lin"), (emb.weight, mu_e, nu_e, "emb")):
            st = opt.state[w]
            assert st["stat_step"] == t and st["step"] == t
            torch.testing.assert_close(st["mu"], mu_r, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(st["nu"], nu_r, rtol=1e-13, atol=1e-15)
            mu_c = mu_r / (1 - bm**t)
            d = [max(float(nu_r[j]) / (1 - bv**t) - float(mu_c[j]) ** 2, 0.0) for j in range(len(mu_r))]
            var = [(1 - s) * dj + s * sum(d) / len(d) for dj in d]
            torch.testing.assert_close(opt.last[key]["mu"], mu_c, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(opt.last[key]["var"], torch.tensor(var, dtype=F64),
                                       rtol=1e-12, atol=1e-15)


def test_reference_momentum_and_update_identity_params() -> None:
    """Identity-metric parameters: momentum with bias correction, global n, decoupled decay."""
    torch.manual_seed(0)
    model = nn.LayerNorm(4).to(F64).train()
    beta, lr, wd, min_norm = 0.7, 0.2, 0.05, 1e-2
    opt = ReferenceSLNB(model.parameters(), model=model, momentum=beta, lr=lr, weight_decay=wd)
    assert opt.neurons == []
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 4):
        opt.zero_grad()
        x = torch.randn(3, 4, generator=gen, dtype=F64)
        (model(x) * torch.arange(4, dtype=F64)).sum().backward()
        before = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        opt.step()
        g = []
        for i in range(len(params)):
            m[i] = beta * m[i] + (1 - beta) * grads[i]
            g.append(m[i] / (1 - beta**t))
        n = math.sqrt(max(min_norm**2, sum(float((gi * gi).sum()) for gi in g)))
        assert opt.last_step_norm == pytest.approx(n, rel=1e-13)
        for p, b, gi in zip(params, before, g):
            torch.testing.assert_close(p.detach(), b - lr * (gi / n + wd * b), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("case_name", ["conv2d", "gpt2"])
def test_reference_grad_accumulation_equals_full_batch(case_name: str) -> None:
    """Two micro-batches of B/2 give the same step as one batch of B."""
    case, model = _build(case_name)
    model2 = copy.deepcopy(model)
    o1 = ReferenceSLNB(model.parameters(), model=model)
    o2 = ReferenceSLNB(model2.parameters(), model=model2)
    for batch in _batches(case, 4, 3):
        _train_step(model, o1, case, batch, 1)
        _train_step(model2, o2, case, batch, 2)
    torch.testing.assert_close(_vec(model2), _vec(model), rtol=1e-12, atol=1e-13)


def test_reference_ignores_eval_and_no_grad_forwards() -> None:
    """Forwards in eval mode or under no_grad do not count as inputs."""
    case, model = _build("mlp_layernorm")
    model2 = copy.deepcopy(model)
    o1 = ReferenceSLNB(model.parameters(), model=model)
    o2 = ReferenceSLNB(model2.parameters(), model=model2)
    for batch in _batches(case, 6, 3):
        junk = torch.randn(5, 5, dtype=F64) * 10
        with torch.no_grad():
            model2(junk)
        model2.eval()
        model2(junk).sum()
        model2.train()
        _train_step(model, o1, case, batch, 1)
        _train_step(model2, o2, case, batch, 1)
    torch.testing.assert_close(_vec(model2), _vec(model), rtol=0, atol=0)


def test_reference_tied_embedding_owned_by_lm_head() -> None:
    """GPT-2's tied wte/lm_head weight gets the metric of lm_head (features = hidden size)."""
    _, opt = _ref_steps("gpt2", 1)
    names = {n.name for n in opt.neurons}
    assert "lm_head" in names and "transformer.wte" not in names
    assert "transformer.wpe" in names
    assert opt.last["lm_head"]["mu"].numel() == 16


# ---------------------------------------------------------------------------- SLNB vs reference
def _slnb_cls() -> type:
    """The implementation under test (imported lazily so the reference self-checks run alone)."""
    import functools

    from hf_slnb import SLNB

    return functools.partial(SLNB, preset="paper")  # the published algorithm, number for number


def _describe_diff(model_f: nn.Module, model_r: nn.Module, start: dict[str, torch.Tensor]) -> str:
    """Per parameter: relative error of the accumulated change, worst first."""
    rows = []
    for (name, pf), (_, pr) in zip(model_f.named_parameters(), model_r.named_parameters()):
        dr = pr.detach() - start[name]
        err = float((pf.detach() - pr.detach()).norm())
        rows.append((err / max(float(dr.norm()), 1e-300), err, name))
    rows.sort(reverse=True)
    return "; ".join(f"{n}: |diff|={e:.3e} rel_to_change={r:.3e}" for r, e, n in rows[:4])


def _compare(case_name: str, setting_name: str, seed: int = 0) -> None:
    SLNB = _slnb_cls()
    setting = SETTINGS[setting_name]
    case, model_r = _build(case_name, seed)
    model_f = copy.deepcopy(model_r)
    start = {n: p.detach().clone() for n, p in model_r.named_parameters()}
    opt_r = _make_opt(ReferenceSLNB, model_r, setting)
    opt_f = _make_opt(SLNB, model_f, setting)
    k = setting.get("_accum", 1)
    for t, batch in enumerate(_batches(case, seed + 100), start=1):
        _train_step(model_r, opt_r, case, batch, k)
        _train_step(model_f, opt_f, case, batch, k)
        vr, vf = _vec(model_r), _vec(model_f)
        rel = float((vf - vr).norm() / vr.norm())
        assert rel <= REL_TOL, (
            f"{case_name}/{setting_name}: step {t}: relative parameter difference {rel:.3e}; "
            + _describe_diff(model_f, model_r, start)
        )
        dr, df = opt_r.diagnostics(), opt_f.diagnostics()
        assert df["slnb/preconditioned_fraction"] == pytest.approx(
            dr["slnb/preconditioned_fraction"], rel=1e-12
        ), (t, df, dr)


@pytest.mark.parametrize("setting_name", list(SETTINGS))
@pytest.mark.parametrize("case_name", [c for c in CASES if c != "gpt2"])
def test_slnb_matches_reference(case_name: str, setting_name: str) -> None:
    """hf_slnb.SLNB equals the dense reference to 1e-9 relative after every step."""
    _compare(case_name, setting_name)


@pytest.mark.parametrize("setting_name", list(SETTINGS))
def test_slnb_matches_reference_gpt2(setting_name: str) -> None:
    """Tiny GPT-2 (Conv1D, tied wte/lm_head, wpe, LayerNorms) in float64."""
    _compare("gpt2", setting_name)


def test_slnb_state_matches_reference() -> None:
    """Documented state entries (step, momentum_buffer, mu, nu, stat_step) agree."""
    SLNB = _slnb_cls()
    case, model_r = _build("mlp_layernorm")
    model_f = copy.deepcopy(model_r)
    opt_r = ReferenceSLNB(model_r.parameters(), model=model_r)
    opt_f = SLNB(model_f.parameters(), model=model_f)
    for batch in _batches(case, 7, 3):
        _train_step(model_r, opt_r, case, batch, 1)
        _train_step(model_f, opt_f, case, batch, 1)
    for (name, pr), pf in zip(model_r.named_parameters(), model_f.parameters()):
        sr, sf = opt_r.state[pr], opt_f.state[pf]
        for key in ("step", "stat_step"):
            if key in sr:
                assert int(sf[key]) == sr[key], (name, key)
        for key in ("momentum_buffer", "mu", "nu"):
            if key in sr:
                torch.testing.assert_close(sf[key].to(F64).reshape(-1), sr[key].reshape(-1),
                                           rtol=1e-10, atol=1e-14, msg=f"{name} {key}")


def test_slnb_ignores_eval_and_no_grad_forwards_like_reference() -> None:
    """Extra eval-mode and no_grad forwards change neither implementation's step."""
    SLNB = _slnb_cls()
    case, model_r = _build("mlp_layernorm")
    model_f = copy.deepcopy(model_r)
    opt_r = ReferenceSLNB(model_r.parameters(), model=model_r)
    opt_f = SLNB(model_f.parameters(), model=model_f)
    for t, batch in enumerate(_batches(case, 8, 4), start=1):
        junk = torch.randn(5, 5, dtype=F64) * 10
        with torch.no_grad():
            model_f(junk)
        model_f.eval()
        model_f(junk).sum()
        model_f.train()
        _train_step(model_r, opt_r, case, batch, 1)
        _train_step(model_f, opt_f, case, batch, 1)
        vr, vf = _vec(model_r), _vec(model_f)
        assert float((vf - vr).norm() / vr.norm()) <= REL_TOL, t


def test_slnb_skips_non_finite_step_like_reference() -> None:
    """A NaN gradient at step 2 skips that step (RuntimeWarning) in both; later steps agree."""
    SLNB = _slnb_cls()
    case, model_r = _build("linear_bias")
    model_f = copy.deepcopy(model_r)
    opt_r = ReferenceSLNB(model_r.parameters(), model=model_r)
    opt_f = SLNB(model_f.parameters(), model=model_f)
    for t, batch in enumerate(_batches(case, 9, 4), start=1):
        for model, opt in ((model_r, opt_r), (model_f, opt_f)):
            opt.zero_grad(set_to_none=True)
            case.loss(model, batch).backward()
            before = _vec(model)
            if t == 2:
                model[2].weight.grad[0, 0] = float("nan")
                with pytest.warns(RuntimeWarning):
                    opt.step()
                assert torch.equal(_vec(model), before)
            else:
                opt.step()
        vr, vf = _vec(model_r), _vec(model_f)
        assert float((vf - vr).norm() / vr.norm()) <= REL_TOL, t
    assert opt_f.diagnostics()["slnb/skipped_steps"] == 1
    assert opt_r.diagnostics()["slnb/skipped_steps"] == 1


@pytest.mark.parametrize(
    ("case_name", "setting", "loss_scale"),
    [
        ("mlp_layernorm", {}, 1.0),  # n above min_norm
        ("mlp_layernorm", {}, 1e-6),  # tiny gradients: n = min_norm
        ("linear_bias", {"cg_iters": 0}, 1.0),  # every h is the zero warm start: n = min_norm
    ],
    ids=["plain", "tiny_grad", "cg0"],
)
def test_slnb_step_norm_diagnostic_is_n(case_name: str, setting: dict[str, Any],
                                        loss_scale: float) -> None:
    """CONTRACT: ``slnb/step_norm`` is n = sqrt(max(min_norm^2, sum <h, g>)), the clamped value
    the update divides by."""
    SLNB = _slnb_cls()
    case, model_r = _build(case_name)
    model_f = copy.deepcopy(model_r)
    opt_r = ReferenceSLNB(model_r.parameters(), model=model_r, **setting)
    opt_f = SLNB(model_f.parameters(), model=model_f, **setting)
    for t, batch in enumerate(_batches(case, 11, 3), start=1):
        for model, opt in ((model_r, opt_r), (model_f, opt_f)):
            opt.zero_grad(set_to_none=True)
            (case.loss(model, batch) * loss_scale).backward()
            opt.step()
        vr, vf = _vec(model_r), _vec(model_f)
        assert float((vf - vr).norm() / vr.norm()) <= REL_TOL, t
        n_r = opt_r.diagnostics()["slnb/step_norm"]
        n_f = opt_f.diagnostics()["slnb/step_norm"]
        assert n_f == pytest.approx(n_r, rel=REL_TOL), f"step {t}: SLNB {n_f!r} vs n = {n_r!r}"
