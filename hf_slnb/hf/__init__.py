"""SLNB in the Hugging Face Trainer: ``--optim slnb``, typed options, diagnostics, model card.

Installing the package is enough: a ``.pth`` hook (``_hf_slnb_autoregister``) calls
:func:`patch_module` on ``transformers.training_args`` and ``transformers.trainer`` right after
each loads, so unmodified scripts accept ``--optim slnb``.
:func:`register` does the same explicitly (for ``HF_SLNB_AUTOREGISTER=0`` or an environment
where the ``.pth`` hook is not installed).

What registration changes, and nothing more:

* ``OptimizerNames`` gains ``SLNB = "slnb"`` (so argparse ``choices``, ``TrainingArguments``
  validation and unpickling ``training_args.bin`` accept it);
* ``TrainingArguments.__post_init__`` is wrapped: with ``optim="slnb"`` it fails fast on setups
  SLNB does not support, validates the SLNB options and, when ``learning_rate`` was left at the
  class default (5e-5 for Adam) and lr is a trust-region radius (``preset=paper``), uses SLNB's
  own default lr instead;
* ``Trainer.get_optimizer_cls_and_kwargs`` (public and unchanged from transformers 5.0 to 5.24)
  answers ``"slnb"``: the Trainer's parameter groups (no weight decay on biases and norms) are
  passed to :class:`~hf_slnb.SLNB` bound to the model; every other ``--optim`` goes to the
  original;
* ``Trainer.log`` adds :meth:`SLNB.diagnostics` to training logs (only on logging steps),
  ``Trainer.__init__`` re-checks the accelerator's setup and makes the model card name SLNB.

Modules: :mod:`.args` (:class:`SLNBTrainingArguments` and ``--optim_args``, generated from
:data:`hf_slnb.config.OPTIONS`), :mod:`.checks` (fail-fast checks, validation, the default lr),
:mod:`.card` (the model card's section), :mod:`.patch` (the wrappers and registration).

Importing this package imports transformers (the core package does not until it is used) and,
as its only side effect, adds ``slnb`` to ``OptimizerNames`` and wraps
``TrainingArguments.__post_init__``: defining :class:`SLNBTrainingArguments` needs no
registration, but parsing it does (argparse takes ``--optim``'s choices from ``OptimizerNames``
when the parser is built).
"""

from __future__ import annotations

import importlib

# .args first: it imports transformers.training_args, whose start-up hook must find this package
# still loading (without patch_module) and leave the registration to the lines at the end.
from .args import (
    HF_OPTIONS,
    OPTIM_NAME,
    SLNBTrainingArguments,
    parse_optim_args,
    resolved_config,
    resolved_option,
    slnb_optimizer_kwargs,
)
from .card import add_to_model_card, card_hyperparameters, describe_update, model_card_section
from .patch import (
    AUTOREGISTER_ENV,
    SUPPORTED_TRANSFORMERS,
    _patch_training_args,
    check_transformers_version,
    patch_module,
    register,
    unwrap_optimizer,
)

check_transformers_version()
_patch_training_args(importlib.import_module("transformers.training_args"))

__all__ = ["AUTOREGISTER_ENV", "HF_OPTIONS", "OPTIM_NAME", "SUPPORTED_TRANSFORMERS",
           "SLNBTrainingArguments", "add_to_model_card", "card_hyperparameters",
           "check_transformers_version", "describe_update", "model_card_section",
           "parse_optim_args", "patch_module", "register", "resolved_config", "resolved_option",
           "slnb_optimizer_kwargs", "unwrap_optimizer"]
