"""Checkpoints that resume exactly or are refused, groups added late, errors raised early.

Issue 11 items 1, 6, 7, 11 and 12: options recorded in ``state_dict`` and checked on load,
``add_param_group`` validated and hooked, bad flags refused, dtype changes followed, parameter
shapes checked by name, sparse embeddings and parametrized layers reported at construction,
``skipped_steps`` checkpointed, the ``--optim_args`` override warning printed once.
"""

from __future__ import annotations

import copy
import io
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hf_slnb import SLNB


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8),
                         nn.Linear(8, 4, bias=False)).to(dtype)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(model: nn.Module, opt: SLNB, steps: int, start: int = 0) -> None:
    dtype = next(model.parameters()).dtype
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + s)
        x, y = torch.randn(24, 6, generator=g), torch.randn(24, 4, generator=g)
        ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def _save_load(sd: dict[str, Any]) -> dict[str, Any]:
    """Through ``torch.save`` / ``torch.load(weights_only=True)``, as the Trainer does."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _old_format(sd: dict[str, Any]) -> dict[str, Any]:
    """A state dict as today's main writes it: no options record in the groups."""
    sd = copy.deepcopy(sd)
    for group in sd["param_groups"]:
        group.pop("slnb")
    return sd


def _trained(steps: int = 3, **kwargs: Any) -> tuple[nn.Module, SLNB]:
    m = _mlp()
    opt = SLNB(m.parameters(), model=m, **kwargs)
    _train(m, opt, steps)
    return m, opt


# ---------------------------------------------------------------------------------------------
# 1. The options that give the state its meaning are saved and checked
# ---------------------------------------------------------------------------------------------
def test_cross_preset_resume_is_refused_naming_every_difference() -> None:
    _, paper = _trained(preset="paper")
    sd = _save_load(paper.state_dict())
    m = _mlp(seed=1)
    default = SLNB(m.parameters(), model=m)
    before = _flat(m).clone()
    message = (r"Cannot load this SLNB checkpoint: it was written with other options, which give "
               r"its state another meaning \(preset: checkpoint 'paper', this optimizer 'graft'; "
               r"trust_region: checkpoint 'global', this optimizer 'graft_row'; ridge_mode: "
               r"checkpoint 'absolute', this optimizer 'relative'; diagonal_only: checkpoint "
               r"False, this optimizer True; direction: checkpoint 'pcg', this optimizer "
               r"'diagonal'\)\. Build the optimizer with the checkpoint's options "
               r"\(preset='paper', trust_region='global', ridge_mode='absolute', "
               r"diagonal_only=False, direction='pcg'; in the Hugging Face Trainer the same keys "
               r"in --optim_args\)")
    with pytest.raises(ValueError, match=message):
        default.load_state_dict(sd)
    assert len(default.state) == 0 and default.param_groups[0]["lr"] == 3e-3  # nothing loaded
    _train(m, default, 1)  # and it still trains as a fresh optimizer: a normal-sized step
    assert (_flat(m) - before).abs().max() < 0.05


@pytest.mark.parametrize("saved,loading,named", [
    ({"trust_region": "tensor"}, {}, "trust_region: checkpoint 'tensor', this optimizer 'graft_row'"),
    ({}, {"diagonal_only": False}, "diagonal_only: checkpoint True, this optimizer False"),
    ({"precondition_embeddings": False}, {},
     "precondition_embeddings: checkpoint False, this optimizer True"),
    ({"skip_modules": ("^3$",)}, {}, "skip_modules: checkpoint ['^3$'], this optimizer []"),
    ({"norm_decay": 0.99}, {}, "norm_decay: checkpoint 0.99, this optimizer 0.999"),
    ({"ridge_mode": "absolute"}, {}, "ridge_mode: checkpoint 'absolute', this optimizer 'relative'"),
])
def test_each_option_that_gives_the_state_its_meaning_must_match(
        saved: dict[str, Any], loading: dict[str, Any], named: str) -> None:
    _, opt = _trained(**saved)
    m = _mlp()
    other = SLNB(m.parameters(), model=m, **loading)
    with pytest.raises(ValueError, match=re.escape(named)):
        other.load_state_dict(_save_load(opt.state_dict()))


def test_free_options_may_change_and_the_loading_optimizers_are_used() -> None:
    """metric_backend, min_norm, eps, cg_tol: the resumed run equals one built with the new ones."""
    kw: dict[str, Any] = {"preset": "paper", "cg_iters": 3}
    new: dict[str, Any] = {"metric_backend": "matrix_free", "min_norm": 0.5, "eps": 1e-6,
                           "cg_tol": 1e-3}
    a, oa = _trained(3, **kw)
    sd = _save_load(oa.state_dict())
    # Reference: the same first three steps, then an optimizer built with the new options that
    # takes over the state tensors directly (no load_state_dict).
    b = copy.deepcopy(a)
    ob = SLNB(b.parameters(), model=b, **kw, **new)
    for p, q in zip(a.parameters(), b.parameters()):
        ob.state[q] = copy.deepcopy(oa.state[p])
    assert {k: sd["param_groups"][0]["slnb"][k] for k in new} == {
        "metric_backend": "auto", "min_norm": 1e-2, "eps": 1e-8, "cg_tol": 1e-5}  # recorded
    c = copy.deepcopy(a)
    oc = SLNB(c.parameters(), model=c, **kw, **new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: nothing is replaced
        oc.load_state_dict(sd)
    assert (oc.metric_backend, oc.min_norm, oc.eps, oc.cg_tol) == tuple(new.values())
    _train(b, ob, 3, start=3)
    _train(c, oc, 3, start=3)
    assert torch.equal(_flat(b), _flat(c))


def test_state_dict_records_the_options_in_every_group() -> None:
    m = _mlp()
    opt = SLNB([{"params": m[0].parameters()}, {"params": m[3].parameters(), "lr": 1e-3}],
               model=m, preset="paper", skip_modules=("^3$",))
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        assert group["slnb"] == {
            "format": 1, "preset": "paper", "trust_region": "global", "ridge_mode": "absolute",
            "diagonal_only": False, "precondition_embeddings": True, "skip_modules": ["^3$"],
            "norm_decay": 0.999, "direction": "pcg", "orth_layers": "blocks",
            "orth_rest": "adam", "lr_scale": 1.0, "rest_lr_scale": 1.0,
            "metric_backend": "auto", "min_norm": 1e-2, "orth_dtype": "auto", "orth_split": True,
            "whiten_every": 10, "cov_every": 1,
            "cov_rows": 0, "max_block": 256,
            "eps": 1e-8, "cg_tol": 1e-5, "skipped_steps": 0, "steps_taken": 0}
    assert all("slnb" not in g for g in opt.param_groups)  # the live groups are untouched
    opt.load_state_dict(_save_load(sd))
    assert all("slnb" not in g for g in opt.param_groups)


def test_newer_checkpoint_format_is_refused() -> None:
    _, opt = _trained(1)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["slnb"]["format"] = 99
    with pytest.raises(ValueError, match=r"its format 99 is newer than this hf_slnb's \(1\)"):
        opt.load_state_dict(sd)


def test_replaced_constructor_hyperparameters_are_named_in_a_warning() -> None:
    _, opt = _trained(2)
    m = _mlp()
    other = SLNB(m.parameters(), model=m, lr=1e-4, cg_iters=7)
    with pytest.warns(UserWarning, match=r"the checkpoint's hyperparameters replace this "
                      r"optimizer's \(as in torch\.optim\): group 0 lr=0\.0001 -> 0\.003; "
                      r"group 0 cg_iters=7 -> 2\. To change one after resuming, set "
                      r"optimizer\.param_groups\[i\]\[key\] after load_state_dict"):
        other.load_state_dict(_save_load(opt.state_dict()))
    assert other.param_groups[0]["lr"] == 3e-3 and other.param_groups[0]["cg_iters"] == 2

    # The Trainer's resume: the same base lr, the schedule's current lr differs: no warning.
    m = _mlp()
    opt = SLNB(m.parameters(), model=m, lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    _train(m, opt, 1)
    sched.step()
    sched.step()
    sd = _save_load(opt.state_dict())
    m2 = _mlp()
    fresh = SLNB(m2.parameters(), model=m2, lr=0.01)
    torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0 / (1 + s))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.01 / 3)


@pytest.mark.parametrize("preset", ["graft", "paper"])
def test_old_format_checkpoint_resumes_exactly_with_a_warning(preset: str) -> None:
    a, _ = _trained(6, preset=preset)
    b, ob = _trained(3, preset=preset)
    sd = _old_format(_save_load(ob.state_dict()))
    c = _mlp(seed=5)
    c.load_state_dict(b.state_dict())
    oc = SLNB(c.parameters(), model=c, preset=preset)
    with pytest.warns(UserWarning, match=r"this checkpoint does not record its options \(it was "
                      r"written by an older hf_slnb\): preset, ridge_mode, "
                      r"precondition_embeddings, skip_modules, norm_decay could not be checked"):
        oc.load_state_dict(sd)
    _train(c, oc, 3, start=3)
    assert torch.equal(_flat(a), _flat(c))


def test_old_format_cross_preset_checkpoint_is_refused() -> None:
    _, paper = _trained(preset="paper")
    m = _mlp()
    default = SLNB(m.parameters(), model=m)
    with pytest.raises(ValueError, match=r"it does not record its options \(it was written by an "
                       r"older hf_slnb\), and its state shows options other than this "
                       r"optimizer's \(trust_region: checkpoint 'global', this optimizer "
                       r"'graft_row'; diagonal_only: checkpoint False, this optimizer True\)"):
        default.load_state_dict(_old_format(paper.state_dict()))
    assert len(default.state) == 0


# ---------------------------------------------------------------------------------------------
# 12. skipped_steps is checkpointed
# ---------------------------------------------------------------------------------------------
def test_skipped_steps_survive_a_checkpoint() -> None:
    m, opt = _trained(2)
    m(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    m[0].weight.grad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
    sd = _save_load(opt.state_dict())
    m2 = _mlp()
    fresh = SLNB(m2.parameters(), model=m2)
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 1 and fresh.diagnostics()["slnb/skipped_steps"] == 1.0


# ---------------------------------------------------------------------------------------------
# 6. add_param_group: validated like the constructor, its layers preconditioned
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ({"lr": -1}, r"Invalid lr=-1 in parameter group 1: must be >= 0\."),
    ({"momentum": 1.5}, r"Invalid momentum=1\.5 in parameter group 1: must be in \[0\.0, 1\.0\)"),
    ({"cg_iters": "2"}, r"Invalid cg_iters='2' in parameter group 1: must be an integer >= 0"),
    ({"ridge": math.nan}, r"Invalid ridge=nan in parameter group 1: must be finite"),
])
def test_add_param_group_is_validated_like_the_constructor(override: dict[str, Any],
                                                           message: str) -> None:
    m = _mlp()
    opt = SLNB(m[0].parameters(), model=m)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": list(m[3].parameters()), **override})
    assert len(opt.param_groups) == 1  # the bad group is not kept
    # the constructor gives the same message for the same group
    with pytest.raises(ValueError, match=message):
        SLNB([{"params": m[0].parameters()}, {"params": m[3].parameters(), **override}], model=m)


def test_add_param_group_refuses_parameters_the_model_does_not_own() -> None:
    m = _mlp()
    opt = SLNB(m[0].parameters(), model=m)
    with pytest.raises(ValueError, match=r"not owned by model=Sequential"):
        opt.add_param_group({"params": list(nn.Linear(2, 2).parameters())})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("preset", ["graft", "paper"])
def test_add_param_group_preconditions_the_new_layers(preset: str) -> None:
    """Layers added later train exactly as if their group had been given to the constructor."""
    a, b = _mlp(), _mlp()
    groups = [{"params": list(a[0].parameters())}, {"params": list(a[3].parameters()), "lr": 0.02}]
    oa = SLNB(groups, model=a, preset=preset)
    ob = SLNB(b[0].parameters(), model=b, preset=preset)
    ob.add_param_group({"params": list(b[3].parameters()), "lr": 0.02})
    assert [n.name for n in ob.neurons] == [n.name for n in oa.neurons] == ["0", "3"]
    for m, o in ((a, oa), (b, ob)):
        for p in m[2].parameters():
            p.requires_grad_(False)  # LayerNorm: in no group
        _train(m, o, 4)
    assert "mu" in ob.state[b[3].weight]
    assert torch.equal(_flat(a), _flat(b))


def test_add_param_group_joins_the_bias_of_a_hooked_layer() -> None:
    a, b = _mlp(), _mlp()
    oa = SLNB([{"params": [a[0].weight]}, {"params": [a[0].bias]}], model=a)
    ob = SLNB([b[0].weight], model=b)
    ob.add_param_group({"params": [b[0].bias]})
    assert ob.neurons[0].bias is b[0].bias
    for m, o in ((a, oa), (b, ob)):
        for p in list(m[2].parameters()) + list(m[3].parameters()):
            p.requires_grad_(False)
        _train(m, o, 3)
    assert torch.equal(_flat(a), _flat(b))


# ---------------------------------------------------------------------------------------------
# 11. Errors at the right time, naming what is wrong
# ---------------------------------------------------------------------------------------------
def test_model_double_after_construction_follows_the_dtype() -> None:
    """Built on float32, then ``model.double()``: equal to SLNB built on the float64 model."""
    kw: dict[str, Any] = {"preset": "paper", "cg_iters": 3}
    a = _mlp(dtype=torch.float32)
    oa = SLNB(a.parameters(), model=a, **kw)
    a.double()
    b = _mlp(dtype=torch.float32).double()
    ob = SLNB(b.parameters(), model=b, **kw)
    _train(a, oa, 3)
    _train(b, ob, 3)
    assert torch.equal(_flat(a), _flat(b))
    assert all(v.dtype == torch.float64 for k, v in oa.state[a[0].weight].items()
               if k not in ("step", "stat_step"))


def test_dtype_change_mid_training_casts_the_state() -> None:
    """float32 steps, ``model.double()``, more steps == a float64 optimizer loading the state."""
    kw: dict[str, Any] = {"preset": "paper", "cg_iters": 3}
    a = _mlp(dtype=torch.float32)
    oa = SLNB(a.parameters(), model=a, **kw)
    _train(a, oa, 2)
    sd = copy.deepcopy(oa.state_dict())
    b = copy.deepcopy(a).double()
    ob = SLNB(b.parameters(), model=b, **kw)
    ob.load_state_dict(sd)  # load_state_dict casts the state to the parameters' dtype
    a.double()
    _train(a, oa, 2, start=2)
    _train(b, ob, 2, start=2)
    assert torch.equal(_flat(a), _flat(b))


def test_state_dict_of_another_model_is_refused_naming_the_parameter() -> None:
    _, opt = _trained(2)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.LayerNorm(5),
                          nn.Linear(5, 4, bias=False)).double()
    fresh = SLNB(other.parameters(), model=other)
    with pytest.raises(ValueError, match=r"Invalid state_dict: its 'momentum_buffer' for "
                       r"parameter '0\.weight' \(group 0, position 0\) has shape \(8, 6\), but "
                       r"this optimizer needs \(5, 6\): the checkpoint was written for another "
                       r"model"):
        fresh.load_state_dict(opt.state_dict())
    assert len(fresh.state) == 0


def test_sparse_embedding_is_refused_at_construction() -> None:
    m = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Invalid model: module '0' is Embedding\(sparse=True\), "
                       r"whose sparse gradients SLNB does not support; build it with "
                       r"sparse=False"):
        SLNB(m.parameters(), model=m)
    SLNB(m[1].parameters(), model=m)  # its weight left out of params: fine


def test_parametrized_layers_are_reported_once_at_construction() -> None:
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        old_style = nn.utils.weight_norm(nn.Linear(2, 2))
    m = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 3)), nn.Tanh(),
                      parametrizations.spectral_norm(nn.Linear(3, 2)), nn.Linear(2, 2), old_style)
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SLNB(m.parameters(), model=m)
    # Nothing was computed to find out: spectral_norm's power-iteration vectors are untouched.
    assert all(torch.equal(b, buffers[n]) for n, b in m.named_buffers())
    texts = [str(w.message) for w in caught if "identity metric" in str(w.message)]
    assert texts == [("SLNB gives the identity metric to '0', '2', '4': their weight is computed "
                      "from other parameters (torch.nn.utils.parametrize, weight_norm), so the "
                      "metric of their inputs does not apply to the parameters trained. Remove "
                      "the parametrization (torch.nn.utils.parametrize.remove_parametrizations) "
                      "to precondition them.")]
    assert [n.name for n in opt.neurons] == ["3"]


# ---------------------------------------------------------------------------------------------
# The Trainer: a cross-preset resume fails; the override warning is printed once
# ---------------------------------------------------------------------------------------------


def _trainer_args(tmp_path: Path, cls: Any = None, **kwargs: Any) -> Any:
    from transformers import TrainingArguments

    import hf_slnb

    hf_slnb.register()
    defaults: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"), "optim": "slnb", "max_steps": 2,
        "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none",
        "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
    }
    defaults.update(kwargs)
    return (cls or TrainingArguments)(**defaults)


def _tiny_gpt2_and_data() -> tuple[Any, Any]:
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1,
                                       n_head=2, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    ids = ((torch.arange(16)[:, None] + torch.arange(8)) % 32).tolist()
    return model, Dataset.from_dict({"input_ids": ids, "labels": ids})


@pytest.mark.usefixtures("float32_one_thread")
def test_trainer_resume_of_a_paper_checkpoint_without_the_preset_fails(tmp_path: Path) -> None:
    from transformers import Trainer

    model, data = _tiny_gpt2_and_data()
    args = _trainer_args(tmp_path / "a", optim_args="preset=paper", save_strategy="steps",
                         save_steps=2)
    Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    model, data = _tiny_gpt2_and_data()
    trainer = Trainer(model=model, args=_trainer_args(tmp_path / "b", max_steps=4),
                      train_dataset=data)
    with pytest.raises(ValueError, match=r"preset: checkpoint 'paper', this optimizer "
                       r"'whitened'.*lr_scale: checkpoint 1.0, this optimizer 10.0.*"
                       r"Build the optimizer with the checkpoint's options \(preset='paper'"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.usefixtures("float32_one_thread")
@pytest.mark.parametrize("optim_args,message", [
    ("preset=PAPER", r"--optim slnb: Invalid preset='PAPER': must be one of \('graft', 'paper', 'whitened'\)"),
    ("preset=adam", r"--optim slnb: Invalid preset='adam': must be one of \('graft', 'paper', 'whitened'\)"),
])
def test_trainer_unknown_preset_is_a_value_error_when_arguments_are_built(
        tmp_path: Path, optim_args: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _trainer_args(tmp_path, optim_args=optim_args)  # default learning rate


@pytest.mark.usefixtures("float32_one_thread")
def test_trainer_unknown_preset_field_is_a_value_error(tmp_path: Path) -> None:
    from hf_slnb.integration import SLNBTrainingArguments

    with pytest.raises(ValueError, match=r"Invalid preset='PAPER': must be one of"):
        _trainer_args(tmp_path, SLNBTrainingArguments, slnb_preset="PAPER")


@pytest.mark.usefixtures("float32_one_thread")
def test_trainer_override_warning_is_printed_once(tmp_path: Path) -> None:
    from transformers import Trainer

    from hf_slnb.integration import SLNBTrainingArguments

    model, data = _tiny_gpt2_and_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every call that warns is seen, wherever it comes from
        args = _trainer_args(tmp_path, SLNBTrainingArguments, slnb_ridge=0.5,
                             optim_args="ridge=0.2", max_steps=1)
        Trainer(model=model, args=args, train_dataset=data).train()
    overrides = [str(w.message) for w in caught if "overrides" in str(w.message)]
    assert overrides == ["--optim_args ridge=0.2 overrides --slnb_ridge=0.5."]
