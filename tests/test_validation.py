"""Bad input gets a ValueError naming the value and the allowed range, before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_slnb import SLNB

BAD = [
    ({"lr": -0.1}, r"Invalid lr=-0\.1.*>= 0"),
    ({"lr": float("nan")}, r"Invalid lr=nan.*finite"),
    ({"lr": "0.1"}, r"Invalid lr='0\.1'.*real number"),
    ({"weight_decay": -1e-4}, r"Invalid weight_decay=-0\.0001.*>= 0"),
    ({"momentum": 1.0}, r"Invalid momentum=1\.0.*\[0\.0, 1\.0\)"),
    ({"momentum": -0.5}, r"Invalid momentum=-0\.5.*\[0\.0, 1\.0\)"),
    ({"mean_decay": 1.5}, r"Invalid mean_decay=1\.5.*\[0\.0, 1\.0\)"),
    ({"sq_mean_decay": 1.0}, r"Invalid sq_mean_decay=1\.0.*\[0\.0, 1\.0\)"),
    ({"shrinkage": 1.0}, r"Invalid shrinkage=1\.0.*\[0\.0, 1\.0\)"),
    ({"shrinkage": -0.1}, r"Invalid shrinkage=-0\.1.*\[0\.0, 1\.0\)"),
    ({"ridge": -1.0}, r"Invalid ridge=-1\.0.*>= 0"),
    ({"cg_iters": -1}, r"Invalid cg_iters=-1.*integer >= 0"),
    ({"cg_iters": 2.5}, r"Invalid cg_iters=2\.5.*integer >= 0"),
    ({"cg_iters": True}, r"Invalid cg_iters=True.*integer >= 0"),
    ({"min_norm": 0.0}, r"Invalid min_norm=0\.0.*> 0"),
    ({"min_norm": -1.0}, r"Invalid min_norm=-1\.0.*> 0"),
    ({"cg_tol": -1.0}, r"Invalid cg_tol=-1\.0.*>= 0"),
    ({"metric_backend": "dense"}, r"Invalid metric_backend='dense'.*one of"),
    ({"skip_modules": ["("]}, r"Invalid skip_modules entry '\('"),
    ({"skip_modules": 3},
     r"Invalid skip_modules=3: must be a sequence of regular expressions \(strings\)"),
    ({"skip_modules": [b"lm_head"]},
     r"Invalid skip_modules entry b'lm_head': must be a regular expression \(a string\)"),
    ({"diagonal_only": "false"},
     r"Invalid diagonal_only='false': must be True or False \(or None for the preset's value\)"),
    ({"diagonal_only": 0}, r"Invalid diagonal_only=0: must be True or False"),
    ({"precondition_embeddings": "False"},
     r"Invalid precondition_embeddings='False': must be True or False"),
    ({"preset": ["paper"]}, r"Invalid preset=\['paper'\]: must be one of \('graft', 'paper', 'whitened'\)"),
    ({"eps": float("inf")}, r"Invalid eps=inf: must be a finite number > 0"),
    ({"cg_tol": float("inf")}, r"Invalid cg_tol=inf: must be a finite number >= 0"),
    ({"cg_tol": float("nan")}, r"Invalid cg_tol=nan: must be a finite number >= 0"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_hyperparameter(kwargs: dict, message: str) -> None:
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        SLNB(m.parameters(), model=m, **kwargs)


GROUP_BAD = [
    ({"lr": -1.0}, r"Invalid lr=-1\.0 in parameter group 1: must be >= 0"),
    ({"shrinkage": 2.0}, r"Invalid shrinkage=2\.0 in parameter group 1"),
    ({"cg_iters": -3}, r"Invalid cg_iters=-3 in parameter group 1"),
    ({"ridge": -0.5}, r"Invalid ridge=-0\.5 in parameter group 1"),
]


@pytest.mark.parametrize("override,message", GROUP_BAD, ids=[str(k) for k, _ in GROUP_BAD])
def test_bad_hyperparameter_in_any_group(override: dict, message: str) -> None:
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    groups = [{"params": m[0].parameters()}, {"params": m[1].parameters(), **override}]
    with pytest.raises(ValueError, match=message):
        SLNB(groups, model=m)


def test_model_must_own_the_parameters() -> None:
    m, other = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"not owned by model=Linear"):
        SLNB(other.parameters(), model=m)


def test_model_must_be_a_module() -> None:
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Invalid model=None"):
        SLNB(m.parameters(), model=None)  # type: ignore[arg-type]


def test_no_parameters_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        SLNB([], model=nn.Linear(2, 2))


@pytest.mark.parametrize("preset", ["graft", "whitened"])
def test_step_norm_counts_a_layer_that_saw_no_input(preset: str) -> None:
    """A layer with no captured input is part of ``slnb/step_norm``, sqrt(sum_p <h, g>) (dense
    check; a direction that skipped such a layer once left no term at all and failed): under
    ``graft`` it takes the identity metric, ``h = g``; under ``whitened`` it is orthogonalised
    with its whitening as it stands, the identity: ``h = orth(g)`` at RMS 0.2."""
    from hf_slnb import whitened as W

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).double()
    opt = SLNB(m.parameters(), model=m, preset=preset)
    opt.remove_hooks()
    (m(torch.randn(5, 3, dtype=torch.float64)) ** 3).sum().backward()
    grads = [p.grad.detach().clone() for p in m.parameters()]
    opt.step()  # the first step's bias-corrected momentum is the gradient
    h = grads[0]
    if preset == "whitened":
        h = W.orthogonalize_ns5(grads[0]) * 0.2 * 2.0  # RMS 0.2: 0.2 sqrt(max(4, 3))
    total = (h * grads[0]).sum() + sum(g.pow(2).sum() for g in grads[1:])
    torch.testing.assert_close(float(opt.diagnostics()["slnb/step_norm"]), total.sqrt().item())


@pytest.mark.parametrize("preset", ["graft", "whitened"])
def test_remove_hooks_detaches(preset: str) -> None:
    m = nn.Linear(3, 2)
    opt = SLNB(m.parameters(), model=m, preset=preset)
    opt.remove_hooks()
    m(torch.randn(4, 3)).sum().backward()
    assert opt.neurons[0].capture is None
    opt.step()  # identity metric: a normalised gradient step
    assert "mu" not in opt.state[m.weight]
