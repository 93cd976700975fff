"""Registration: the transformers entry points wrapped for ``--optim slnb``.

* ``OptimizerNames`` gains ``SLNB = "slnb"``;
* ``TrainingArguments.__post_init__``: fail-fast checks, option validation, SLNB's default lr;
* ``Trainer.get_optimizer_cls_and_kwargs``: the Trainer's parameter groups go to :class:`SLNB`
  bound to the model (every other ``--optim`` goes to the original);
* ``Trainer.__init__`` (re-checks the accelerator, adds the card section), ``Trainer.log``
  (diagnostics on logging steps) and the model card's ``optimizer`` line.

Each wrapper finds the original on itself (``__hf_slnb_original__``), so registering twice is a
no-op.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import inspect
from types import ModuleType
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.training_args import TrainingArguments

from ..optimizer import SLNB
from .args import OPTIM_NAME, slnb_optimizer_kwargs
from .card import add_to_model_card, optimizer_line
from .checks import _check_setup, _is_slnb, _resolve_learning_rate, _validate, check_trainer

#: transformers versions this glue is tested with: CI runs the integration tests on the newest
#: release and on 5.0.0. It uses only public entry points (``OptimizerNames``,
#: ``TrainingArguments.__post_init__``, ``Trainer.get_optimizer_cls_and_kwargs``), so later 5.x
#: releases are allowed; 6.0 may change them.
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
#: Environment variable that switches the ``.pth`` auto-registration off ("0").
AUTOREGISTER_ENV = "HF_SLNB_AUTOREGISTER"

_WRAPPED = "__hf_slnb_original__"  # marks our wrappers, so registering twice is a no-op


# ---------------------------------------------------------------------------------------------
# TrainingArguments
# ---------------------------------------------------------------------------------------------
def _post_init(self: TrainingArguments) -> None:
    """``TrainingArguments.__post_init__`` with the SLNB checks and defaults in front."""
    if _is_slnb(self.optim):
        _check_setup(self)
        _validate(self)  # first: every option error is the SLNB constructor's own
        _resolve_learning_rate(self)
    getattr(_post_init, _WRAPPED)(self)


# ---------------------------------------------------------------------------------------------
# The Trainer's optimizer handler
# ---------------------------------------------------------------------------------------------
def _bind_model(model: torch.nn.Module) -> type[SLNB]:
    """An :class:`SLNB` subclass whose constructor takes ``params, **kwargs`` (model bound).

    The Trainer calls ``optimizer_cls(param_groups, **kwargs)`` and treats a ``model`` key in
    ``kwargs`` as LOMO's, so the model travels in the class instead.
    """

    class TrainerSLNB(SLNB):
        __doc__ = SLNB.__doc__

        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, model=model, **kwargs)

    return TrainerSLNB


def _get_optimizer_cls_and_kwargs(args: TrainingArguments, model: Any = None) -> tuple[Any, Any]:
    """``Trainer.get_optimizer_cls_and_kwargs`` that also knows ``--optim slnb``.

    Every other optimizer name goes to transformers' own function, unchanged.
    """
    if not _is_slnb(args.optim):
        return getattr(_get_optimizer_cls_and_kwargs, _WRAPPED)(args, model)
    if model is None:
        raise ValueError("--optim slnb needs the model: SLNB hooks its layers. Build the "
                         "optimizer through Trainer.create_optimizer().")
    _check_setup(args)  # SLNB itself checks that sharded parameters are FSDP2's
    kwargs = {"lr": args.learning_rate, **slnb_optimizer_kwargs(args),
              "weight_decay": args.weight_decay}
    _destroy_process_group_at_exit()
    return _bind_model(model), kwargs


_EXIT_HOOK: list[bool] = []


def _destroy_process_group_at_exit() -> None:
    """Tear the data-parallel process group down before the interpreter does.

    Scripts written like Hugging Face's examples never call ``destroy_process_group()``; with
    gloo (CPU) the process group's threads are then destroyed during interpreter shutdown, which
    intermittently aborts a rank ("terminate called without an active exception") after all
    work is saved, and the launcher reports the run as failed. ``destroy_process_group()`` alone
    does not stop them: the Trainer's DDP wrapper, kept alive by Python reference cycles until
    the interpreter finalises, still holds the group, whose destructor joins its threads.
    Collecting the garbage right after it runs that destructor while the interpreter is whole
    (checked under torchrun with tests/hf_example_script.py: no ``pt_gloo_runloop`` or
    ``gloo_tcp_loop`` thread is left at the last atexit hook, against three without it).
    """
    if _EXIT_HOOK:
        return
    _EXIT_HOOK.append(True)

    def destroy() -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001, S110 - best effort at exit; never mask the real status
                pass
        gc.collect()  # frees the DDP wrapper: the group's destructor joins its threads now

    atexit.register(destroy)


# ---------------------------------------------------------------------------------------------
# Trainer: fail-fast, diagnostics, model card
# ---------------------------------------------------------------------------------------------
def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer (accelerate's ``AcceleratedOptimizer`` wraps the real one)."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, SLNB) and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def _trainer_init(self: Any, *args: Any, **kwargs: Any) -> None:
    getattr(_trainer_init, _WRAPPED)(self, *args, **kwargs)
    if not _is_slnb(getattr(self.args, "optim", None)):
        return
    check_trainer(self)
    if self.optimizer is not None and not isinstance(unwrap_optimizer(self.optimizer), SLNB):
        return  # the user passed their own optimizer: --optim is not used
    card = self.create_model_card  # the most derived one (TRL's does not call the base)

    @functools.wraps(card)
    def create_model_card(*args: Any, **kwargs: Any) -> Any:
        out = card(*args, **kwargs)
        add_to_model_card(self)
        return out

    self.create_model_card = create_model_card


def _trainer_log(self: Any, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
    if "loss" in logs:  # a training logging step (not eval, not the end-of-training summary)
        optimizer = unwrap_optimizer(getattr(self, "optimizer", None))
        if isinstance(optimizer, SLNB):
            logs.update(optimizer.diagnostics())
    return getattr(_trainer_log, _WRAPPED)(self, logs, *args, **kwargs)


def _extract_hyperparameters(trainer: Any) -> dict[str, Any]:
    hyperparameters = getattr(_extract_hyperparameters, _WRAPPED)(trainer)
    if _is_slnb(getattr(trainer.args, "optim", None)) and "optimizer" in hyperparameters:
        hyperparameters["optimizer"] = optimizer_line(trainer.args, trainer.model)
    return hyperparameters


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def check_transformers_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless transformers is in :data:`SUPPORTED_TRANSFORMERS`."""
    if version is None:  # looked up now: transformers swaps its sys.modules entry while loading
        version = str(importlib.import_module("transformers").__version__)
    if not SpecifierSet(SUPPORTED_TRANSFORMERS).contains(Version(version), prereleases=True):
        raise RuntimeError(
            f"hf_slnb supports transformers {SUPPORTED_TRANSFORMERS}, but transformers {version} "
            f"is installed; install a supported version (pip install 'transformers"
            f"{SUPPORTED_TRANSFORMERS}') or use SLNB directly as a torch optimizer."
        )


def _extend_enum(enum_cls: Any, name: str, value: str) -> Any:
    """Add ``name = value`` to a ``(str, Enum)`` class in place (idempotent)."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in enum_cls.__dict__:
        raise RuntimeError(f"{enum_cls.__name__}.{name} already exists with another value")
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ forbids this on purpose
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def _wrap(owner: Any, attr: str, wrapper: Any) -> None:
    """Install ``wrapper`` as ``owner.attr`` once; the wrapper finds the original on itself.

    A ``staticmethod`` stays one.
    """
    current = getattr(owner, attr)
    if getattr(current, _WRAPPED, None) is not None:
        return
    functools.update_wrapper(wrapper, current, updated=())
    setattr(wrapper, _WRAPPED, current)
    static = isinstance(inspect.getattr_static(owner, attr), staticmethod)
    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)


def _patch_training_args(module: ModuleType) -> None:
    _extend_enum(module.OptimizerNames, "SLNB", OPTIM_NAME)
    _wrap(module.TrainingArguments, "__post_init__", _post_init)


def _patch_trainer(module: ModuleType) -> None:
    _wrap(module.Trainer, "__init__", _trainer_init)
    _wrap(module.Trainer, "log", _trainer_log)
    _wrap(module.Trainer, "get_optimizer_cls_and_kwargs", _get_optimizer_cls_and_kwargs)
    from transformers import modelcard

    _wrap(modelcard, "extract_hyperparameters_from_trainer", _extract_hyperparameters)


_PATCHES = {
    "transformers.training_args": _patch_training_args,
    "transformers.trainer": _patch_trainer,
}


def patch_module(module: ModuleType) -> None:
    """Patch one freshly imported transformers module (called by the ``.pth`` import hook).

    Raises:
        RuntimeError: If the installed transformers is outside :data:`SUPPORTED_TRANSFORMERS`.
    """
    check_transformers_version()
    _PATCHES[module.__name__](module)


def register() -> None:
    """Make ``--optim slnb`` available to every ``TrainingArguments`` and Trainer (idempotent).

    Needed only where the ``.pth`` auto-registration is off (``HF_SLNB_AUTOREGISTER=0``) or not
    installed; calling it again does nothing.

    Raises:
        RuntimeError: If the installed transformers is outside :data:`SUPPORTED_TRANSFORMERS`.
    """
    check_transformers_version()
    for name, patch in _PATCHES.items():
        patch(importlib.import_module(name))


__all__ = ["AUTOREGISTER_ENV", "SUPPORTED_TRANSFORMERS", "check_transformers_version",
           "patch_module", "register", "unwrap_optimizer"]
