"""Options that depart from the paper, each checked against a dense computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_slnb import SLNB
from hf_slnb.optimizer import PRESETS


def _setup(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(40, 5, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 2.0
    y = torch.randn(40, 3, dtype=torch.float64)
    return lin, x, y


def _dense_solution(x: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor,
                    ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise exact solve of (X~^T X~ / N + ridge I_W) h = g for a Linear with bias."""
    xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    c = xt.T @ xt / x.shape[0]
    c = c + ridge * torch.diag(torch.tensor([1.0] * x.shape[1] + [0.0], dtype=x.dtype))
    g = torch.cat([grad_w, grad_b[:, None]], 1)
    h = torch.linalg.solve(c, g.T).T
    return h[:, :-1], h[:, -1]


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_ridge_mode_against_dense_solve(mode: str) -> None:
    lin, x, y = _setup()
    before_w, before_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = SLNB(lin.parameters(), model=lin, preset="paper", ridge=0.5, ridge_mode=mode, cg_iters=50, cg_tol=0.0,
               momentum=0.0, weight_decay=0.0, lr=0.2)
    ((lin(x) - y) ** 2).mean().backward()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    opt.step()
    ridge = 0.5 * (x**2).mean(0).mean().item() if mode == "relative" else 0.5
    hw, hb = _dense_solution(x, gw, gb, ridge)
    n = ((hw * gw).sum() + (hb * gb).sum()).sqrt()
    torch.testing.assert_close(lin.weight.detach(), before_w - 0.2 * hw / n, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lin.bias.detach(), before_b - 0.2 * hb / n, rtol=1e-9, atol=1e-12)


def test_relative_ridge_is_invariant_to_input_scale() -> None:
    """With the relative ridge, scaling inputs by c and the weights by 1/c gives the same function."""
    lin, x, y = _setup()
    scaled = nn.Linear(5, 3).double()
    with torch.no_grad():
        scaled.weight.copy_(lin.weight / 100.0)
        scaled.bias.copy_(lin.bias)
    kw = dict(preset="paper", ridge=0.1, ridge_mode="relative", cg_iters=50, cg_tol=0.0, weight_decay=0.0,
              shrinkage=0.0)
    oa, ob = SLNB(lin.parameters(), model=lin, **kw), SLNB(scaled.parameters(), model=scaled, **kw)
    for _ in range(3):
        for m, inp, o in ((lin, x, oa), (scaled, x * 100.0, ob)):
            ((m(inp) - y) ** 2).mean().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(lin(x), scaled(x * 100.0), rtol=1e-8, atol=1e-10)


def test_tensor_trust_region_against_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    x = torch.randn(30, 4, dtype=torch.float64)
    model.double()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = SLNB(model.parameters(), model=model, preset="paper", trust_region="tensor", norm_decay=0.9, eps=1e-8,
               lr=1e-2, cg_iters=50, cg_tol=0.0, momentum=0.0, weight_decay=0.0, ridge=0.3)
    model(x).pow(3).mean().backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    hw, hb = _dense_solution(x, grads[0], grads[1], 0.3)
    hs = [hw, hb, grads[2], grads[3]]  # LayerNorm: identity metric
    for p, p0, h, g in zip(params, before, hs, grads):
        rms = ((h * g).sum() / p.numel()).sqrt()  # step 1: the bias-corrected EMA is the value
        torch.testing.assert_close(p.detach(), p0 - 1e-2 * h / (rms + 1e-8), rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    ({"trust_region": "row"}, r"Invalid trust_region='row'"),
    ({"norm_decay": 1.0}, r"Invalid norm_decay=1\.0"),
    ({"eps": 0.0}, r"Invalid eps=0\.0"),
    ({"eps": float("inf")}, r"Invalid eps=inf: must be a finite number > 0\."),
    ({"preset": ["paper"]}, r"Invalid preset=\['paper'\]: must be one of \('graft', 'paper', 'whitened'\)"),
    ({"ridge_mode": "scaled"}, r"Invalid ridge_mode='scaled'"),
    ({"preset": "adam"}, r"Invalid preset='adam': must be one of \('graft', 'paper', 'whitened'\)"),
])
def test_bad_option(kwargs: dict, message: str) -> None:
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=message):
        SLNB(m.parameters(), model=m, **kwargs)


def test_adam_graft_against_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    params = list(model.parameters())
    opt = SLNB(model.parameters(), model=model, preset="paper", trust_region="graft", norm_decay=0.99, eps=1e-8,
               lr=1e-2, cg_iters=50, cg_tol=0.0, momentum=0.9, weight_decay=0.0, ridge=0.3)
    xs = [torch.randn(30, 4, dtype=torch.float64) for _ in range(2)]
    grads: list[list[torch.Tensor]] = []
    for step, x in enumerate(xs):
        before = [p.detach().clone() for p in params]
        model(x).pow(3).mean().backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
        t = step + 1
        m = [sum(0.1 * 0.9 ** (t - 1 - i) * grads[i][k] for i in range(t)) / (1 - 0.9**t)
             for k in range(4)]
        v = [sum(0.01 * 0.99 ** (t - 1 - i) * grads[i][k] ** 2 for i in range(t)) / (1 - 0.99**t)
             for k in range(4)]
        adam = [mk / (vk.sqrt() + 1e-8) for mk, vk in zip(m, v)]
        hw, hb = _dense_solution(x, m[0], m[1], 0.3) if t == 1 else (None, None)
        if t == 1:  # the converged solve on this step's inputs
            for k, h in ((0, hw), (1, hb)):
                expected = before[k] - 1e-2 * h * adam[k].norm() / h.norm()
                torch.testing.assert_close(params[k].detach(), expected, rtol=1e-9, atol=1e-12)
        for k in (2, 3):  # LayerNorm: Adam's own step
            torch.testing.assert_close(params[k].detach(), before[k] - 1e-2 * adam[k],
                                       rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("hf_conv1d", [False, True])
def test_adam_graft_per_row_against_dense(hf_conv1d: bool) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer: nn.Module = Conv1D(3, 4) if hf_conv1d else nn.Linear(4, 3)
    layer.double()
    x = torch.randn(30, 4, dtype=torch.float64)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = SLNB(layer.parameters(), model=layer, preset="paper", trust_region="graft_row",
               norm_decay=0.99,
               eps=1e-8, lr=1e-2, cg_iters=50, cg_tol=0.0, momentum=0.0, weight_decay=0.0,
               ridge=0.3)
    layer(x).pow(3).mean().backward()
    gw = layer.weight.grad.clone()
    gb = layer.bias.grad.clone()
    opt.step()
    gw_rows = gw.T if hf_conv1d else gw  # (out, in)
    hw, hb = _dense_solution(x, gw_rows, gb, 0.3)
    adam_w = gw_rows / (gw_rows.abs() + 1e-8)  # step 1: m / sqrt(v) = g / |g|
    adam_b = gb / (gb.abs() + 1e-8)
    expected_w = hw * adam_w.norm(dim=1, keepdim=True) / hw.norm(dim=1, keepdim=True)
    expected_b = hb * adam_b.norm() / hb.norm()  # the bias is grafted as one tensor
    got_w = (layer.weight.detach() - w0) / -1e-2
    torch.testing.assert_close(got_w.T if hf_conv1d else got_w, expected_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((layer.bias.detach() - b0) / -1e-2, expected_b, rtol=1e-9,
                               atol=1e-12)


def test_presets_set_only_what_is_not_given() -> None:
    m = nn.Linear(2, 2)
    paper = SLNB(m.parameters(), model=m, preset="paper")
    graft = SLNB(m.parameters(), model=m)
    mixed = SLNB(m.parameters(), model=m, preset="paper", ridge=0.7)
    assert (paper.defaults["lr"], paper.defaults["ridge"], paper.trust_region,
            paper.ridge_mode) == (0.1, 0.1, "global", "absolute")
    assert (graft.defaults["lr"], graft.defaults["ridge"], graft.trust_region,
            graft.ridge_mode) == (3e-3, 1.0, "graft_row", "relative")
    assert mixed.defaults["ridge"] == 0.7 and mixed.trust_region == "global"


def test_a_direction_the_preset_step_rule_cannot_scale_names_the_preset() -> None:
    """The whitened preset's step rule ('orth') scales an orthogonalised direction only: asking
    it for SLNB's PCG direction is refused, naming the value, where it comes from and what to
    pass instead; giving trust_region as well is what the user meant."""
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Invalid trust_region='orth' with direction='pcg'.*"
                       r"That trust_region comes from preset 'whitened': .*pass preset='graft'"):
        SLNB(m.parameters(), model=m, preset="whitened", diagonal_only=False)
    opt = SLNB(m.parameters(), model=m, preset="whitened", diagonal_only=False,
               trust_region="graft_row")
    assert opt.config.direction == "pcg"


def test_presets_decide_whether_embeddings_are_preconditioned() -> None:
    m = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    kinds = {name: {n.kind for n in SLNB(m.parameters(), model=m, preset=name).neurons}
             for name in PRESETS}
    for name, settings in PRESETS.items():
        assert ("embedding" in kinds[name]) == settings.precondition_embeddings, name
    # ALGORITHM.md makes every embedding a neuron: the paper preset must keep it.
    assert PRESETS["paper"].precondition_embeddings is True
    off = SLNB(m.parameters(), model=m, preset="paper", precondition_embeddings=False)
    assert {n.kind for n in off.neurons} == {"linear"}


class _Block(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


def test_the_default_preset_is_the_models() -> None:
    """No preset given: 'whitened' (lr_scale 10) for a model with a trained Linear inside a
    repeated block, 'graft' for any other (a plain MLP, a CNN whose blocks hold convolutions
    only, a transformer whose blocks are frozen), where 'whitened' would be AdamW at 10x the lr.
    A preset given is kept."""
    transformer = nn.Sequential(nn.ModuleList(_Block() for _ in range(2)), nn.Linear(4, 3))
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    cnn = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()),
                        nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU()), nn.Flatten(),
                        nn.Linear(2, 3))
    frozen = nn.Sequential(nn.ModuleList(_Block() for _ in range(2)), nn.Linear(4, 3))
    frozen[0].requires_grad_(False)
    for model, want in ((transformer, "whitened"), (mlp, "graft"), (cnn, "graft"),
                        (frozen, "graft")):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = SLNB(params, model=model)
        assert (opt.preset, opt.config.lr_scale) == (want, 10.0 if want == "whitened" else 1.0)
        opt.remove_hooks()
    opt = SLNB(mlp.parameters(), model=mlp, preset="whitened")
    assert opt.preset == "whitened"
    opt.remove_hooks()
    opt = SLNB(transformer.parameters(), model=transformer, preset="graft")
    assert opt.preset == "graft"
    opt.remove_hooks()
