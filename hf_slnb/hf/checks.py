"""Checks and defaults applied to ``TrainingArguments`` with ``--optim slnb``, before training."""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import torch
from transformers.training_args import TrainingArguments

from ..optimizer import SLNB
from ..step_rules import step_rule
from .args import OPTIM_NAME, resolved_config, resolved_option, slnb_optimizer_kwargs

# The logger keeps the name it had when this code was hf_slnb/integration.py, so logging
# configured for it (and tests capturing it) still sees these messages.
logger = logging.getLogger("hf_slnb.integration")

_TRUE = ("true", "1", "yes", "y", "on")


def _is_slnb(optim: Any) -> bool:
    return str(getattr(optim, "value", optim)) == OPTIM_NAME


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _rank_zero() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _unsupported(what: str, why: str) -> ValueError:
    return ValueError(
        f"--optim slnb does not support {what} yet ({why}). Train with plain data parallel "
        "or FSDP2 instead (torchrun / accelerate launch without a DeepSpeed configuration, "
        "--fsdp with fsdp_config version 2), or choose another --optim."
    )


def _fsdp_version(args: TrainingArguments) -> int:
    """The FSDP version the Trainer will ask Accelerate for (its default is 2)."""
    config = args.fsdp_config
    if isinstance(config, str):
        try:
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = None  # the Trainer reports a bad path itself
    if isinstance(config, dict):
        return int(config.get("version", config.get("fsdp_version", 2)))
    return 2


def _check_setup(args: TrainingArguments) -> None:
    """Fail fast, before any model is built, on setups SLNB does not support."""
    if args.deepspeed or _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise _unsupported("DeepSpeed", "ZeRO partitions the parameters and gradients whose "
                           "layers SLNB hooks, and DeepSpeed owns the optimizer step")
    fsdp1 = ("FSDP version 1", ("it flattens every wrapped module's parameters into one "
                                "FlatParameter, so the layers SLNB preconditions are gone; FSDP2 "
                                "keeps them"))
    if args.fsdp:
        if _fsdp_version(args) != 2:
            raise _unsupported(*fsdp1)
        if args.use_cpu and _rank_zero():
            logger.warning("--fsdp with --use_cpu: Accelerate trains on CPU as plain data "
                           "parallel (MULTI_CPU) and ignores --fsdp; SLNB synchronises as in "
                           "data parallel.")
    elif _env_true("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise _unsupported(*fsdp1)


def _validate(args: TrainingArguments) -> None:
    """Raise the :class:`SLNB` constructor's own ``ValueError`` for a bad option, before training.

    Without a preset the model picks one, and the model is not known yet: the options are
    checked under the default that accepts them (:func:`resolved_config`); the optimizer, built
    with the model, refuses the rest with the same message."""
    kwargs = slnb_optimizer_kwargs(args, warn=True)
    kwargs["preset"] = resolved_config(kwargs).preset
    probe = torch.nn.Linear(1, 1)
    try:
        with warnings.catch_warnings():  # advice is given once, when the real optimizer is built
            warnings.simplefilter("ignore")
            optimizer = SLNB(probe.parameters(), model=probe, lr=args.learning_rate,
                             weight_decay=args.weight_decay, **kwargs)
    except ValueError as err:
        raise ValueError(f"--optim slnb: {err}") from None
    optimizer.remove_hooks()


def _lr_is_radius(args: TrainingArguments) -> bool:
    """Whether lr is a trust-region radius (not an Adam-like step, as with a per-tensor one)."""
    return step_rule(resolved_option("trust_region", slnb_optimizer_kwargs(args))).lr_is_radius


def _resolve_learning_rate(args: TrainingArguments) -> None:
    """Replace a learning rate left at the class default (an Adam step) by SLNB's default lr
    where lr is a radius; where it is an Adam-like step (every other rule, with the whitened
    preset's ``lr_scale`` mapping AdamW's lr onto its own) keep it, as AdamW would."""
    fields = getattr(type(args), "__dataclass_fields__", {})
    spec = fields.get("learning_rate")
    if spec is None or args.learning_rate != spec.default or not _lr_is_radius(args):
        return
    lr = resolved_option("lr", slnb_optimizer_kwargs(args))
    args.learning_rate = lr
    if _rank_zero():
        logger.warning(
            "--optim slnb: --learning_rate was not given (it is at the default %g, an Adam step "
            "size), so SLNB uses its default lr=%g. SLNB's lr is a trust-region radius: the "
            "length of each update in the metric; pass --learning_rate to choose another.",
            spec.default, lr,
        )


def check_trainer(trainer: Any) -> None:
    """Re-check the accelerator's setup once the Trainer has built it."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise _unsupported("DeepSpeed", "the accelerator is configured for DeepSpeed")
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None),
                     "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and getattr(plugin, "fsdp_version", 2) != 2:
        raise _unsupported("FSDP version 1", "the accelerator is configured for FSDP1, which "
                           "flattens the parameters of the layers SLNB preconditions")
