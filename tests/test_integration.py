"""``--optim slnb`` in the Hugging Face Trainer family (offline, tiny models, CPU).

In-process tests call ``hf_slnb.register()``; ``test_installed.py`` checks the installed package
(the ``.pth`` auto-registration) in a throwaway virtual environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import checkpointing_flag
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames

import hf_slnb
from hf_slnb import SLNB, integration
from hf_slnb.integration import SLNBTrainingArguments, parse_optim_args
from hf_slnb.config import OPTIONS, PRESETS

hf_slnb.register()  # in-process tests do not rely on the .pth hook being installed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("float32_one_thread")
DIAGNOSTICS = ("slnb/step_norm", "slnb/cg_rel_residual", "slnb/preconditioned_fraction")




# ---------------------------------------------------------------------------------------------
# Tiny models and data
# ---------------------------------------------------------------------------------------------
VOCAB, SEQ = 64, 16


def tiny_gpt2(seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config)


def lm_data(n: int = 64, seed: int = 0) -> Dataset:
    """Next token = previous + 1 (mod vocabulary): learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(SEQ)) % VOCAB
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def args_for(tmp_path: Path, cls: type = TrainingArguments, **kwargs: Any) -> TrainingArguments:
    defaults: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"), "optim": "slnb", "max_steps": 3,
        "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none",
        "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
    }
    defaults.update(kwargs)
    return cls(**defaults)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_trainable_changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unchanged = [n for n, p in params.items() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"trainable parameters not updated: {unchanged}"
    moved = [n for n, p in params.items() if not p.requires_grad and not torch.equal(p, before[n])]
    assert not moved, f"frozen parameters changed: {moved}"


def slnb_of(trainer: Trainer) -> SLNB:
    optimizer = integration.unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, SLNB)
    return optimizer


# ---------------------------------------------------------------------------------------------
# Registration and arguments
# ---------------------------------------------------------------------------------------------
def test_register_is_idempotent_and_extends_optimizer_names(tmp_path: Path) -> None:
    n_members = len(OptimizerNames)
    hf_slnb.register()
    hf_slnb.register()
    assert len(OptimizerNames) == n_members
    assert OptimizerNames("slnb") is OptimizerNames.SLNB
    assert OptimizerNames.SLNB == "slnb"
    for owner, attr in ((Trainer, "__init__"), (Trainer, "log"),
                        (Trainer, "get_optimizer_cls_and_kwargs"),
                        (TrainingArguments, "__post_init__")):
        original = getattr(owner, attr).__hf_slnb_original__  # wrapped ...
        assert not hasattr(original, "__hf_slnb_original__")  # ... once
    # The optimizer entry point stays a static method and leaves other optimizers alone.
    assert isinstance(inspect.getattr_static(Trainer, "get_optimizer_cls_and_kwargs"), staticmethod)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args_for(tmp_path, optim="adamw_torch"))
    assert cls is torch.optim.AdamW and kwargs["lr"] == 5e-5
    model = tiny_gpt2()
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args_for(tmp_path), model)
    assert issubclass(cls, SLNB) and kwargs == {"lr": 5e-5, "weight_decay": 0.0}


def test_cli_accepts_optim_slnb_and_optim_args(tmp_path: Path) -> None:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "slnb", "--optim_args", "cg_iters=4,ridge=0.05"]
    )
    assert args.optim is OptimizerNames.SLNB
    kwargs = integration.slnb_optimizer_kwargs(args)
    assert kwargs == {"cg_iters": 4, "ridge": 0.05}
    assert type(kwargs["cg_iters"]) is int and type(kwargs["ridge"]) is float


def test_every_slnb_hyperparameter_has_a_field() -> None:
    trainer_level = {"lr", "weight_decay"}  # --learning_rate and --weight_decay
    options = {o.name for o in OPTIONS} - trainer_level
    fields = {f.name[5:] for f in dataclasses.fields(SLNBTrainingArguments)
              if f.name.startswith("slnb_")}
    assert fields == options
    assert set(integration._option_types()) == options  # the --optim_args keys


def test_slnb_training_arguments_help_and_defaults(tmp_path: Path) -> None:
    text = HfArgumentParser(SLNBTrainingArguments).format_help()
    assert "slnb" in text.split("--optim ", 1)[1][:2000]
    for f in dataclasses.fields(SLNBTrainingArguments):
        if f.name.startswith("slnb_"):
            entry = " ".join(text.split(f"\n  --{f.name} ", 1)[1].split("\n  --", 1)[0].split())
            assert "SLNB: " in entry and "(default: " in entry, f.name
            if f.name == "slnb_preset":
                assert f.default is None and ("(default: the model's: whitened for a "
                                              "transformer, graft otherwise)") in entry
                continue
            # None: the preset's value, which --help shows for every preset (what runs).
            assert f.default is None, f.name
            assert "(default: None)" not in entry, f.name
            name = f.name[5:]
            shown = ", ".join(f"{p} {getattr(c, name) if name != 'skip_modules' else 'none'}"
                              for p, c in PRESETS.items())
            assert f"(default: the preset's: {shown})" in entry, (f.name, entry)
    (args,) = HfArgumentParser(SLNBTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path)])
    assert integration.slnb_optimizer_kwargs(args) == {}  # nothing given: SLNB picks
    (args,) = HfArgumentParser(SLNBTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--slnb_cg_iters", "5", "--slnb_skip_modules", "lm_head",
         "wte", "--slnb_precondition_embeddings", "false", "--slnb_metric_backend", "explicit",
         "--slnb_diagonal_only", "false", "--slnb_preset", "graft"]
    )
    assert args.optim is OptimizerNames.SLNB  # the default of SLNBTrainingArguments
    kwargs = integration.slnb_optimizer_kwargs(args)
    assert kwargs["cg_iters"] == 5 and kwargs["skip_modules"] == ("lm_head", "wte")
    assert kwargs["precondition_embeddings"] is False and kwargs["metric_backend"] == "explicit"
    assert kwargs["diagonal_only"] is False and "ridge" not in kwargs  # unset: the preset's


def test_optim_args_win_over_fields_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="overrides --slnb_ridge"):
        args = args_for(tmp_path, SLNBTrainingArguments, slnb_ridge=0.5, slnb_cg_iters=3,
                        optim_args="ridge=0.2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, tiny_gpt2())
    assert kwargs["ridge"] == 0.2 and kwargs["cg_iters"] == 3 and "model" not in kwargs


def test_optim_args_parse_types() -> None:
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}
    assert parse_optim_args(" momentum = 0.8 , diagonal_only=True,skip_modules=lm_head|wte,"
                            "metric_backend=matrix_free") == {
        "momentum": 0.8, "diagonal_only": True, "skip_modules": ["lm_head|wte"],
        "metric_backend": "matrix_free"}


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("cg_iters=4,ridge", ("Invalid --optim_args item 'ridge' in 'cg_iters=4,ridge': expected "
                              "comma-separated key=value pairs")),
        ("ridge=0.1,", "Invalid --optim_args item ''"),
        ("rigde=0.1", ("Invalid --optim_args key 'rigde' for --optim slnb: must be one of "
                       "cg_iters, cg_tol, cov_every, cov_rows, diagonal_only, ")),  # ... sorted
        ("ridge=abc", ("Invalid --optim_args value ridge='abc' for --optim slnb: must be a "
                       "finite number.")),
        ("ridge=nan", "Invalid --optim_args value ridge='nan' for --optim slnb: must be a finite"),
        ("cg_iters=2.5", ("Invalid --optim_args value cg_iters='2.5' for --optim slnb: must be "
                          "an integer.")),
        ("diagonal_only=maybe", ("Invalid --optim_args value diagonal_only='maybe' for --optim "
                                 "slnb: must be true or false.")),
        ("cg_iters=1,cg_iters=2", "key 'cg_iters' is given twice"),
        ("lr=0.5", "Invalid --optim_args key 'lr' for --optim slnb: set it with --learning_rate"),
        ("weight_decay=0.1", "set it with --weight_decay"),
        ("ridge=-1", "--optim slnb: Invalid ridge=-1.0: must be >= 0."),
        ("momentum=1", "--optim slnb: Invalid momentum=1.0: must be in [0.0, 1.0)."),
        ("cg_iters=-1", "--optim slnb: Invalid cg_iters=-1: must be an integer >= 0."),
        ("metric_backend=dense", "--optim slnb: Invalid metric_backend='dense': must be one of"),
        ("ridge_mode=scaled", "--optim slnb: Invalid ridge_mode='scaled': must be one of"),
    ],
)
def test_bad_optim_args_fail_when_arguments_are_built(tmp_path: Path, optim_args: str,
                                                      message: str) -> None:
    with pytest.raises(ValueError) as err:
        args_for(tmp_path, optim_args=optim_args)
    assert message in str(err.value)


def test_bad_learning_rate_fails_early(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Invalid lr=-0.1: must be >= 0"):
        args_for(tmp_path, learning_rate=-0.1)


@pytest.mark.parametrize(
    ("setting", "what"),
    [
        ({"deepspeed": {"train_micro_batch_size_per_gpu": 4}}, "DeepSpeed"),
        ({"fsdp": True, "fsdp_config": {"version": 1}}, "FSDP version 1"),
        ({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 1}}, "FSDP version 1"),
    ],
)
def test_unsupported_setups_fail_fast(tmp_path: Path, setting: dict, what: str) -> None:
    with pytest.raises(ValueError, match=f"--optim slnb does not support {what}"):
        args_for(tmp_path, **setting)


def test_fsdp2_is_accepted_and_cpu_fsdp_is_explained(tmp_path: Path, caplog) -> None:
    # FSDP2 (the Trainer's default FSDP version) keeps the layers: SLNB takes its shards
    # (tests/test_fsdp.py). On CPU Accelerate runs --fsdp as plain data parallel: say so.
    with caplog.at_level(logging.WARNING, logger="hf_slnb.integration"):
        args = args_for(tmp_path, fsdp=True, fsdp_config={"version": 2})
    assert args.fsdp
    assert "ignores --fsdp" in caplog.text


def test_accelerate_fsdp_environment_fails_fast(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # Accelerate's default version is 1
    with pytest.raises(ValueError, match="does not support FSDP version 1"):
        args_for(tmp_path)
    monkeypatch.setenv("FSDP_VERSION", "2")
    args_for(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        args_for(tmp_path)


def test_unsupported_transformers_version(monkeypatch) -> None:
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(RuntimeError, match=r"supports transformers >=5\.0,<6, but "
                                           r"transformers 4\.57\.1 is installed"):
        hf_slnb.register()
    # The start-up hook turns the same error into a warning and leaves 'slnb' to the stock error.
    spec = importlib.util.spec_from_file_location("_hf_slnb_autoregister_t",
                                                  ROOT / "_hf_slnb_autoregister.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    with pytest.warns(RuntimeWarning, match=r"could not register '--optim slnb'.*>=5\.0,<6"):
        hook._patch(sys.modules["transformers.training_args"])


# ---------------------------------------------------------------------------------------------
# Learning rate: a right first experience
# ---------------------------------------------------------------------------------------------
def test_default_learning_rate_becomes_slnb_default(tmp_path: Path, caplog) -> None:
    # The presets 'whitened' (a transformer's default) and 'graft' take the lr AdamW would be
    # given ('whitened' maps it onto its own step with lr_scale): the Trainer's lr is kept, with
    # nothing to say.
    with caplog.at_level(logging.WARNING, logger="hf_slnb.integration"):
        assert args_for(tmp_path).learning_rate == 5e-5
        assert args_for(tmp_path, optim_args="preset=whitened").learning_rate == 5e-5
        assert args_for(tmp_path, optim_args="preset=graft").learning_rate == 5e-5
        assert args_for(tmp_path, optim_args="preset=graft,trust_region=tensor"
                        ).learning_rate == 5e-5
    assert "--learning_rate was not given" not in caplog.text
    # The paper's preset: lr is a trust-region radius, so the Adam default is replaced.
    paper_lr = PRESETS["paper"].lr
    with caplog.at_level(logging.WARNING, logger="hf_slnb.integration"):
        assert args_for(tmp_path, optim_args="preset=paper").learning_rate == paper_lr
    assert "--learning_rate was not given" in caplog.text
    assert args_for(tmp_path, optim_args="preset=paper", learning_rate=0.3).learning_rate == 0.3
    assert args_for(tmp_path, optim="adamw_torch").learning_rate == 5e-5
    assert args_for(tmp_path, Seq2SeqTrainingArguments,
                    optim_args="preset=paper").learning_rate == paper_lr


def test_options_of_either_default_pass_the_arguments_and_the_model_decides(
        tmp_path: Path) -> None:
    """Without a preset, the arguments (no model yet) accept what either default takes; the
    optimizer, built with the model, refuses what its preset does not, naming the preset."""
    with pytest.raises(ValueError, match=r"--optim slnb: Invalid cg_iters=-1"):
        args_for(tmp_path, optim_args="cg_iters=-1")  # no preset takes it
    args = args_for(tmp_path, optim_args="diagonal_only=false")  # graft's PCG: a CNN's default
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_data())
    with pytest.raises(ValueError, match=r"trust_region comes from preset 'whitened'.*"
                                         r"pass preset='graft'"):
        trainer.train()


def _final_loss(tmp_path: Path, optim: str) -> float:
    model = tiny_gpt2(seed=1)
    args = args_for(tmp_path / optim, optim=optim, max_steps=40, per_device_train_batch_size=8,
                    logging_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data(256))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]


def test_out_of_the_box_at_least_as_good_as_adamw_defaults(tmp_path: Path) -> None:
    slnb, adamw = _final_loss(tmp_path, "slnb"), _final_loss(tmp_path, "adamw_torch")
    assert slnb < adamw, (slnb, adamw)


# ---------------------------------------------------------------------------------------------
# Trainer semantics
# ---------------------------------------------------------------------------------------------
class GradNormSpy(TrainerCallback):
    """Records the gradient norm the optimizer sees (after the Trainer's clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))


def test_gpt2_trainer_groups_diagnostics_clipping(tmp_path: Path) -> None:
    model = tiny_gpt2(dropout=0.1)
    before = snapshot(model)
    spy = GradNormSpy()
    args = args_for(tmp_path, weight_decay=0.01, max_grad_norm=0.05, logging_steps=2, max_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data(), callbacks=[spy])
    trainer.train()
    assert_trainable_changed(model, before)  # Conv1D, tied wte/lm_head, wpe, norms, biases
    optimizer = slnb_of(trainer)
    # The Trainer's parameter groups: weight decay on matrices, none on biases and norms.
    decay = set(trainer.get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.01 if names[id(p)] in decay else 0.0)
    assert any(group["weight_decay"] == 0.0 for group in optimizer.param_groups)
    # Gradients reach SLNB clipped to max_grad_norm.
    assert len(spy.norms) == 4 and max(spy.norms) <= 0.05 * (1 + 1e-4)
    # Diagnostics on every logging step, and only there.
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        assert all(isinstance(h[k], float) for k in DIAGNOSTICS)
        # the default preset, whitened: the blocks' layers (0.78 of the parameters; the
        # embeddings and norms take Adam's step)
        assert h["slnb/preconditioned_fraction"] > 0.7
        assert h["slnb/step_norm"] > 0
    assert not any(k.startswith("slnb/") for h in trainer.state.log_history if "loss" not in h
                   for k in h)


def test_bert_trainer_updates_every_parameter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, num_labels=2))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (32, SEQ), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    before = snapshot(model)
    trainer = Trainer(model=model, args=args_for(tmp_path), train_dataset=data)
    trainer.train()
    assert_trainable_changed(model, before)
    # whitened: the encoder layers' Linear (0.67 of this tiny BERT: its embeddings are large)
    assert trainer.state.log_history[0]["slnb/preconditioned_fraction"] > 0.6
    assert slnb_of(trainer).preset == "whitened"


def test_schedule_and_warmup_act_on_slnb_lr(tmp_path: Path) -> None:
    def moved(**kwargs: Any) -> float:
        model = tiny_gpt2()
        before = snapshot(model)
        trainer = Trainer(model=model, args=args_for(tmp_path, max_steps=2, **kwargs),
                          train_dataset=lm_data())
        trainer.train()
        return max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())

    assert moved(lr_scheduler_type="constant", learning_rate=1e-2) > 1e-3
    # Warm-up from 0 over a million steps: the two steps use lr 0 and 1e-8.
    assert moved(lr_scheduler_type="constant_with_warmup", warmup_steps=10**6,
                 learning_rate=1e-2) < 1e-6


def _train_weights(tmp_path: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=args_for(tmp_path, **kwargs), train_dataset=lm_data())
    trainer.train()
    return snapshot(model)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], msg=name, **tol)


def test_gradient_accumulation_equals_full_batch(tmp_path: Path) -> None:
    full = _train_weights(tmp_path / "a", per_device_train_batch_size=8)
    accumulated = _train_weights(tmp_path / "b", per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2)
    _assert_close(full, accumulated, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_steps(tmp_path: Path) -> None:
    plain = _train_weights(tmp_path / "a")
    checkpointed = _train_weights(tmp_path / "b", **{checkpointing_flag(): True})
    _assert_close(plain, checkpointed, rtol=1e-4, atol=1e-5)


def test_torch_compile_gives_the_same_steps(tmp_path: Path) -> None:
    # aot_eager runs dynamo and AOTAutograd (where hooks could be lost) without inductor's C++
    # build; the default inductor backend gave the same weights too, in 30 s more.
    eager = _train_weights(tmp_path / "a")
    compiled = _train_weights(tmp_path / "b", torch_compile=True,
                              torch_compile_backend="aot_eager")
    _assert_close(eager, compiled, rtol=1e-5, atol=1e-6)


def test_bf16_cpu_autocast(tmp_path: Path) -> None:
    model = tiny_gpt2()
    before = snapshot(model)
    trainer = Trainer(model=model, args=args_for(tmp_path, bf16=True, max_steps=2),
                      train_dataset=lm_data())
    trainer.train()
    assert_trainable_changed(model, before)
    optimizer = slnb_of(trainer)
    for state in optimizer.state.values():
        for key, value in state.items():
            if key in ("step", "stat_step"):  # counters: float64, exact bias corrections
                assert value.dtype == torch.float64, key
            elif torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    fp32 = _train_weights(tmp_path / "fp32", max_steps=2)
    delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()])
    delta32 = torch.cat([(fp32[n] - before[n]).flatten() for n in fp32])
    assert torch.nn.functional.cosine_similarity(delta, delta32, dim=0) > 0.95


def test_resume_from_checkpoint_is_bit_exact(tmp_path: Path) -> None:
    # The default here, whitened, reads the inputs of steps 0, 3, 6: the checkpoint after 4
    # steps must carry that phase (a fresh count would read step 4's).
    kwargs = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4,
              "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2,
              "lr_scheduler_type": "linear", "warmup_steps": 2}
    model = tiny_gpt2(dropout=0.1)
    trainer = Trainer(model=model, args=args_for(tmp_path / "a", **kwargs), train_dataset=lm_data())
    trainer.train()
    uninterrupted = snapshot(model)
    checkpoint = tmp_path / "a" / "out" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed = tiny_gpt2(seed=123, dropout=0.1)
    trainer = Trainer(model=resumed, args=args_for(tmp_path / "b", **kwargs),
                      train_dataset=lm_data())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for name, p in resumed.named_parameters():
        assert torch.equal(p, uninterrupted[name]), name


def test_model_card_names_slnb(tmp_path: Path) -> None:
    args = args_for(tmp_path, optim_args="momentum=0.8")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_data())
    trainer.train()
    trainer.create_model_card(model_name="tiny")
    trainer.create_model_card(model_name="tiny")  # refreshed, not appended twice
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("## Optimizer") == 1
    assert "https://arxiv.org/abs/2502.01131" in card
    assert "- optimizer: SLNB (Simple Linear Neuron Boosting" in card
    assert "| `momentum` | `0.8` |" in card and "| `lr` | `5e-05` |" in card
    assert "| `preset` | `'whitened'` |" in card and "| `lr_scale` | `10.0` |" in card
    # What the default preset runs on a transformer, and nothing it does not: no PCG.
    assert "Muon's orthogonalisation in whitened coordinates" in card
    assert "Every step is taken at `lr_scale * lr` = 10 x 5e-05" in card
    for idle in ("cg_iters", "ridge", "cg_tol", "metric_backend", "min_norm"):
        assert f"`{idle}`" not in card, idle
    # A model without linear layers in repeated blocks gets graft, and its card says so.
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    section = integration.model_card_section(args, mlp)
    assert "| `preset` | `'graft'` |" in section and "`lr_scale`" in section
    assert "no conjugate gradient" in section and "each output row" in section
    assert "lr_scale * lr" not in section


@pytest.mark.parametrize(("optim_args", "present", "absent"), [
    ("preset=paper", ("cg_iters", "ridge", "min_norm", "conjugate-gradient", "radius"),
     ("norm_decay", "eps")),
    ("preset=graft,diagonal_only=false", ("cg_iters", "ridge", "norm_decay",
                                          "conjugate-gradient"),
     ("min_norm",)),
    # lr_scale rescales whatever step rule's sentence (the rule's own, not another's)
    ("preset=graft,lr_scale=3", ("each output row", "`lr_scale * lr` = 3 x"), ()),
    ("preset=whitened,lr_scale=1", ("RMS 0.2 `lr`", "one lr, AdamW's"), ("min_norm",)),
    ("preset=whitened,rest_lr_scale=0.1", ("`rest_lr_scale` = 0.1 times that",), ()),
    ("preset=graft", ("each output row",), ("rest_lr_scale",)),
])
def test_model_card_lists_what_acted(tmp_path: Path, optim_args: str, present: tuple,
                                     absent: tuple) -> None:
    section = integration.model_card_section(args_for(tmp_path, optim_args=optim_args))
    for word in present:
        assert word in section, word
    for word in absent:
        assert f"`{word}`" not in section, word


# ---------------------------------------------------------------------------------------------
# The Trainer family: PEFT LoRA, Seq2SeqTrainer, TRL's SFTTrainer
# ---------------------------------------------------------------------------------------------
def test_lora_finetuning(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
        lora_dropout=0.0))
    before = snapshot(model)
    trainer = Trainer(model=model, args=args_for(tmp_path, max_steps=3), train_dataset=lm_data())
    trainer.train()
    assert_trainable_changed(model, before)  # LoRA A and B move, the base model does not
    assert trainer.state.log_history[-2]["slnb/preconditioned_fraction"] == 1.0


def test_seq2seq_trainer_t5(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (24, 8), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.flip(1).tolist()})
    before = snapshot(model)
    args = args_for(tmp_path, Seq2SeqTrainingArguments, predict_with_generate=True,
                    generation_max_length=8, per_device_eval_batch_size=8)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert_trainable_changed(model, before)
    after = snapshot(model)
    metrics = trainer.evaluate()  # generation and eval passes must not feed SLNB
    assert "eval_loss" in metrics
    assert all(torch.equal(p, after[n]) for n, p in model.named_parameters())
    assert all(n.capture is None for n in slnb_of(trainer).neurons)


def _char_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{c: i + 3 for i, c in
                                                      enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                                unk_token="[UNK]", eos_token="[EOS]")


def test_trl_sft_trainer(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    tokenizer = _char_tokenizer()
    letters = "abcdefghijklmnopqrstuvwxyz"
    data = Dataset.from_dict({"text": [" ".join(letters[i:i + 8]) for i in range(16)]})
    model = tiny_gpt2()
    before = snapshot(model)
    # SFTConfig turns checkpointing on by default: say so by the undeprecated name where it exists.
    flag = checkpointing_flag()
    extra = {flag: True} if flag == "activation_checkpointing" else {}
    args = args_for(tmp_path, trl.SFTConfig, max_length=SEQ, max_steps=2, **extra)
    assert args.learning_rate == 2e-5  # SFTConfig's own default, kept (Adam-like lr)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer)
    trainer.train()
    assert_trainable_changed(model, before)
    assert all(k in trainer.state.log_history[0] for k in DIAGNOSTICS)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SLNB" in card and "https://arxiv.org/abs/2502.01131" in card
