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
  class default (5e-5 for Adam), uses SLNB's own default lr instead;
* ``Trainer.get_optimizer_cls_and_kwargs`` (public and unchanged from transformers 5.0 to 5.24)
  answers ``"slnb"``: the Trainer's parameter groups (no weight decay on biases and norms) are
  passed to :class:`~hf_slnb.SLNB` bound to the model; every other ``--optim`` goes to the
  original;
* ``Trainer.log`` adds :meth:`SLNB.diagnostics` to training logs (only on logging steps),
  ``Trainer.__init__`` re-checks the accelerator's setup and makes the model card name SLNB.

This module imports transformers; the core package does not import it until it is used.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import importlib
import inspect
import json
import logging
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.training_args import OptimizerNames, TrainingArguments

from .layers import BACKENDS
from .optimizer import PAPER_URL, PRESETS, RIDGE_MODES, SLNB, TRUST_REGIONS

logger = logging.getLogger(__name__)

#: The value of ``--optim`` that selects SLNB.
OPTIM_NAME = "slnb"
#: transformers versions this glue is tested with: CI runs the integration tests on the newest
#: release and on 5.0.0. It uses only public entry points (``OptimizerNames``,
#: ``TrainingArguments.__post_init__``, ``Trainer.get_optimizer_cls_and_kwargs``), so later 5.x
#: releases are allowed; 6.0 may change them.
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
#: Environment variable that switches the ``.pth`` auto-registration off ("0").
AUTOREGISTER_ENV = "HF_SLNB_AUTOREGISTER"

_WRAPPED = "__hf_slnb_original__"  # marks our wrappers, so registering twice is a no-op
_CARD_BEGIN = "<!-- hf_slnb:begin -->"
_CARD_END = "<!-- hf_slnb:end -->"
_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def _slnb_default(name: str) -> Any:
    """The default of one :class:`SLNB` constructor argument (the single source of truth).

    ``None`` means "the preset's value" (see :func:`resolved_option`).
    """
    return inspect.signature(SLNB).parameters[name].default


def resolved_option(name: str, kwargs: dict[str, Any]) -> Any:
    """The value :class:`SLNB` will use for ``name`` given these keyword arguments."""
    value = kwargs.get(name)
    if value is not None:
        return value
    default = _slnb_default(name)
    if default is None:
        preset = kwargs.get("preset") or _slnb_default("preset")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"--optim slnb: Invalid preset={preset!r}: must be one of "
                             f"{tuple(PRESETS)}.")
        return PRESETS[preset].get(name)
    return default


# ---------------------------------------------------------------------------------------------
# Typed options
# ---------------------------------------------------------------------------------------------
def _option(name: str, text: str, **metadata: Any) -> Any:
    """A ``slnb_<name>`` dataclass field whose default and help come from :class:`SLNB`."""
    default = _slnb_default(name)  # HfArgumentParser's --help adds "(default: ...)"
    metadata = {"help": f"SLNB: {text}", **metadata}
    if isinstance(default, tuple):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SLNBTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with ``optim="slnb"`` by default and one field per SLNB option.

    The learning rate and weight decay are the Trainer's own ``--learning_rate`` and
    ``--weight_decay``. When ``--learning_rate`` is left at its default, SLNB's default lr is
    used (see the README). A key given in ``--optim_args`` overrides the ``slnb_*`` field of the
    same name (a warning says so when the field was changed too).
    """

    optim: OptimizerNames | str = field(
        default=OPTIM_NAME,
        metadata={"help": "The optimizer to use; 'slnb' (the default here) for SLNB. See "
                  "`OptimizerNames` for the complete list."},
    )
    learning_rate: float = field(
        default=5e-5,
        metadata={"help": "The initial learning rate. With --optim slnb's default preset "
                  "('graft') it is an Adam-like step, as for AdamW. With --slnb_preset paper it is "
                  "SLNB's trust-region radius (the length of each update in the metric), and left "
                  f"at 5e-05 (Adam's default) the paper's lr ({PRESETS['paper']['lr']}) is used "
                  "instead."},
    )
    optim_args: str | None = field(
        default=None,
        metadata={"help": "With --optim slnb: SLNB options as comma-separated key=value pairs, "
                  "e.g. 'preset=paper,cg_iters=4'; the keys are the --slnb_* options without "
                  "the prefix, and a key given here wins over its --slnb_* flag. Other "
                  "optimizers read their own keys."},
    )
    slnb_preset: str = _option(
        "preset", "'graft' (default: SLNB's direction, damped ridge, Adam's step size per "
        "output row) or 'paper' (the published algorithm exactly). Sets lr, ridge, ridge_mode "
        "and trust_region unless they are given.", choices=list(PRESETS))
    slnb_momentum: float = _option("momentum", "decay beta_g of the gradient's moving average, "
                                   "in [0, 1).")
    slnb_mean_decay: float = _option("mean_decay", "decay of the moving average of each layer's "
                                     "input-feature means, in [0, 1).")
    slnb_sq_mean_decay: float = _option("sq_mean_decay", "decay of the moving average of the "
                                        "input features' mean squares, in [0, 1).")
    slnb_shrinkage: float = _option("shrinkage", "share s of the mean variance mixed into each "
                                    "feature's variance in the diagonal preconditioner, "
                                    "in [0, 1).")
    slnb_ridge: float = _option("ridge", "ridge gamma added to the metric on weights (never "
                                "biases); larger is closer to momentum SGD. >= 0.")
    slnb_cg_iters: int = _option("cg_iters", "conjugate-gradient iterations per layer and step, "
                                 "integer >= 0 (0 keeps the previous step's solution).")
    slnb_min_norm: float = _option("min_norm", "floor of the step's metric norm n (the update is "
                                   "lr * h / max(n, min_norm)), > 0.")
    slnb_diagonal_only: bool = _option("diagonal_only", "skip conjugate gradient and use the "
                                       "diagonal preconditioner alone (cheaper, approximate).")
    slnb_precondition_embeddings: bool = _option(
        "precondition_embeddings", "give nn.Embedding its exact metric (token frequencies); "
        "otherwise embeddings use the identity metric.")
    slnb_skip_modules: list[str] = _option(  # noqa: RUF009 - a field(default_factory=...)
        "skip_modules", "regular expressions (re.search on the qualified module name, e.g. "
        "'lm_head'); matching layers use the identity metric.")
    slnb_metric_backend: str = _option(
        "metric_backend", "how the metric is applied: 'explicit' (accumulate x x^T), "
        "'matrix_free' (keep the inputs) or 'auto' (the cheaper per layer); all exact.",
        choices=list(BACKENDS))
    slnb_cg_tol: float = _option("cg_tol", "conjugate gradient stops early once |residual| <= "
                                 "cg_tol * |gradient|, >= 0.")
    slnb_ridge_mode: str = _option(
        "ridge_mode", "'absolute' (the paper: gamma = ridge) or 'relative' (gamma = ridge * the "
        "layer's mean feature second moment, invariant to a rescaling of its inputs).",
        choices=list(RIDGE_MODES))
    slnb_trust_region: str = _option(
        "trust_region", "'global' (the paper: one unit step under the metric for the whole "
        "model; lr is its radius), 'tensor' (each tensor divided by its metric RMS, as in "
        "Adam-mini), 'graft' (each tensor's step has Adam's norm and SLNB's direction) or "
        "'graft_row' (the default preset's: Adam's norm per output row of each layer); with "
        "'tensor', 'graft' and 'graft_row' lr is an Adam-like per-element step.",
        choices=list(TRUST_REGIONS))
    slnb_norm_decay: float = _option("norm_decay", "decay of the per-tensor metric RMS "
                                     "('tensor') or of Adam's squared gradients ('graft'), "
                                     "in [0, 1).")
    slnb_eps: float = _option("eps", "added to the per-tensor RMS ('tensor', 'graft'), > 0.")

    def __post_init__(self) -> None:
        register()
        super().__post_init__()


@functools.cache
def _option_types() -> dict[str, Any]:
    """SLNB option name -> annotated type, from the ``slnb_*`` fields."""
    hints = typing.get_type_hints(SLNBTrainingArguments)
    return {f.name[len("slnb_"):]: hints[f.name] for f in dataclasses.fields(SLNBTrainingArguments)
            if f.name.startswith("slnb_")}


def _convert(key: str, raw: str, kind: Any) -> Any:
    """Convert one ``--optim_args`` value to the option's type, or raise ``ValueError``."""
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        if kind == list[str]:
            if not text:
                raise ValueError
            return [text]
        return text
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a finite number",
                    list[str]: "a regular expression"}.get(kind, "a string")
        raise ValueError(
            f"Invalid --optim_args value {key}={raw!r} for --optim slnb: must be {expected}."
        ) from None


def parse_optim_args(optim_args: str | None) -> dict[str, Any]:
    """Parse ``--optim_args "key=value,..."`` into typed SLNB options.

    Keys are the SLNB option names without the ``slnb_`` prefix (``momentum``, ``mean_decay``,
    ``sq_mean_decay``, ``shrinkage``, ``ridge``, ``cg_iters``, ``min_norm``, ``diagonal_only``,
    ``precondition_embeddings``, ``skip_modules``, ``metric_backend``, ``cg_tol``,
    ``ridge_mode``). Booleans are
    ``true``/``false``; ``skip_modules`` is one regular expression (use ``|`` for several).
    Values cannot contain ``,`` or ``=`` (transformers splits the string on them).

    Args:
        optim_args: The ``TrainingArguments.optim_args`` string, or ``None``.

    Returns:
        Option name -> value of the option's type.

    Raises:
        ValueError: On a malformed item, a repeated, unknown or Trainer-level key (``lr``,
            ``weight_decay``), or a value that does not convert.
    """
    if optim_args is None or not optim_args.strip():
        return {}
    types = _option_types()
    out: dict[str, Any] = {}
    for item in optim_args.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or "=" in raw:
            raise ValueError(
                f"Invalid --optim_args item {item!r} in {optim_args!r}: expected comma-separated "
                "key=value pairs, e.g. 'cg_iters=4,ridge=0.05'."
            )
        if key in ("lr", "learning_rate", "weight_decay"):
            flag = "--weight_decay" if key == "weight_decay" else "--learning_rate"
            raise ValueError(
                f"Invalid --optim_args key {key!r} for --optim slnb: set it with {flag}, which "
                "the Trainer's schedule and parameter groups use."
            )
        if key not in types:
            raise ValueError(
                f"Invalid --optim_args key {key!r} for --optim slnb: must be one of "
                f"{', '.join(sorted(types))}."
            )
        if key in out:
            raise ValueError(f"Invalid --optim_args {optim_args!r}: key {key!r} is given twice.")
        out[key] = _convert(key, raw, types[key])
    return out


def slnb_optimizer_kwargs(args: TrainingArguments, *, warn: bool = False) -> dict[str, Any]:
    """The :class:`SLNB` keyword arguments (besides ``lr``/``weight_decay``) that ``args`` asks for.

    Options come from the ``slnb_*`` fields of :class:`SLNBTrainingArguments` and from
    ``--optim_args``; a key in ``--optim_args`` wins. Options given nowhere are left out, so
    they take the :class:`SLNB` defaults.

    Args:
        args: Any ``TrainingArguments`` (subclass) instance.
        warn: Warn when an ``--optim_args`` key overrides a changed ``slnb_*`` field. The
            arguments are resolved several times (lr, validation, the optimizer, the card):
            only the validation, once per ``TrainingArguments``, warns.

    Returns:
        Keyword arguments for :class:`SLNB`.

    Raises:
        ValueError: For a bad ``--optim_args`` string.
    """
    kwargs: dict[str, Any] = {}
    if isinstance(args, SLNBTrainingArguments):
        kwargs = {name: getattr(args, f"slnb_{name}") for name in _option_types()}
    for key, value in parse_optim_args(args.optim_args).items():
        if (warn and key in kwargs and kwargs[key] != value
                and kwargs[key] != _slnb_default_value(key)):
            warnings.warn(
                f"--optim_args {key}={value!r} overrides --slnb_{key}={kwargs[key]!r}.",
                UserWarning,
                stacklevel=2,
            )
        kwargs[key] = value
    if "skip_modules" in kwargs:
        kwargs["skip_modules"] = tuple(kwargs["skip_modules"])
    return kwargs


def _slnb_default_value(name: str) -> Any:
    default = _slnb_default(name)
    return list(default) if name == "skip_modules" else default


def _validate(args: TrainingArguments) -> None:
    """Raise the :class:`SLNB` constructor's own ``ValueError`` for a bad option, before training."""
    kwargs = slnb_optimizer_kwargs(args, warn=True)
    probe = torch.nn.Linear(1, 1)
    try:
        with warnings.catch_warnings():  # advice is given once, when the real optimizer is built
            warnings.simplefilter("ignore")
            optimizer = SLNB(probe.parameters(), model=probe, lr=args.learning_rate,
                             weight_decay=args.weight_decay, **kwargs)
    except ValueError as err:
        raise ValueError(f"--optim slnb: {err}") from None
    optimizer.remove_hooks()


# ---------------------------------------------------------------------------------------------
# Checks and defaults applied to TrainingArguments
# ---------------------------------------------------------------------------------------------
def _is_slnb(optim: Any) -> bool:
    return str(getattr(optim, "value", optim)) == OPTIM_NAME


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


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
        if args.use_cpu and int(os.environ.get("RANK", "0") or 0) == 0:
            logger.warning("--fsdp with --use_cpu: Accelerate trains on CPU as plain data "
                           "parallel (MULTI_CPU) and ignores --fsdp; SLNB synchronises as in "
                           "data parallel.")
    elif _env_true("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise _unsupported(*fsdp1)


def _lr_is_radius(args: TrainingArguments) -> bool:
    """Whether lr is a trust-region radius (not an Adam-like step, as with a per-tensor one)."""
    from .step_rules import step_rule

    return step_rule(resolved_option("trust_region", slnb_optimizer_kwargs(args))).lr_is_radius


def _resolve_learning_rate(args: TrainingArguments) -> None:
    """Replace a learning rate left at the class default (an Adam step) by SLNB's default lr."""
    fields = getattr(type(args), "__dataclass_fields__", {})
    spec = fields.get("learning_rate")
    if spec is None or args.learning_rate != spec.default or not _lr_is_radius(args):
        return
    lr = resolved_option("lr", slnb_optimizer_kwargs(args))
    args.learning_rate = lr
    if int(os.environ.get("RANK", "0") or 0) == 0:
        logger.warning(
            "--optim slnb: --learning_rate was not given (it is at the default %g, an Adam step "
            "size), so SLNB uses its default lr=%g. SLNB's lr is a trust-region radius: the "
            "length of each update in the metric; pass --learning_rate to choose another.",
            spec.default, lr,
        )


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
            except Exception:  # noqa: BLE001 - best effort at exit; never mask the real status
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
    if getattr(self, "is_deepspeed_enabled", False):
        raise _unsupported("DeepSpeed", "the accelerator is configured for DeepSpeed")
    plugin = getattr(getattr(getattr(self, "accelerator", None), "state", None), "fsdp_plugin",
                     None)
    if getattr(self, "is_fsdp_enabled", False) and getattr(plugin, "fsdp_version", 2) != 2:
        raise _unsupported("FSDP version 1", "the accelerator is configured for FSDP1, which "
                           "flattens the parameters of the layers SLNB preconditions")
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


def card_hyperparameters(args: TrainingArguments) -> dict[str, Any]:
    """The SLNB hyperparameters that acted in a run with ``args`` (given or default).

    Options that do nothing under the resolved settings are left out: the PCG options
    (``ridge``, ``ridge_mode``, ``cg_iters``, ``cg_tol``, ``metric_backend``) with
    ``diagonal_only=True``, ``min_norm`` outside the global trust region, ``norm_decay`` and
    ``eps`` inside it.
    """
    kwargs = slnb_optimizer_kwargs(args)
    values: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    for name in _option_types():
        values[name] = resolved_option(name, kwargs)
    values["skip_modules"] = list(values["skip_modules"])
    inactive = set()
    if values["diagonal_only"]:
        inactive |= {"ridge", "ridge_mode", "cg_iters", "cg_tol", "metric_backend"}
    if values["trust_region"] == "global":
        inactive |= {"norm_decay", "eps"}
    else:
        inactive.add("min_norm")
    return {k: v for k, v in values.items() if k not in inactive}


def describe_update(values: dict[str, Any]) -> str:
    """One paragraph saying what SLNB computed with these (resolved) hyperparameters."""
    if values["diagonal_only"]:
        direction = (
            "The direction of each linear layer is its momentum gradient preconditioned by "
            "SLNB's diagonal incomplete-Cholesky inverse of the layer's input-feature second "
            "moment (means and variances of the inputs, `h = P g`; no conjugate gradient).")
    else:
        direction = (
            "The direction of each linear layer solves its input-feature metric "
            "`(J^T J / N + ridge) h = g` (momentum gradient `g`) by "
            f"{values['cg_iters']} warm-started preconditioned conjugate-gradient iterations, "
            f"{values['ridge_mode']} ridge {values['ridge']:g}.")
    if not values["precondition_embeddings"]:
        direction += " Embeddings take the identity metric."
    rule = values["trust_region"]
    if rule == "global":
        step = ("The whole update is one step of metric length `lr` (a trust-region radius), "
                "as published.")
    elif rule == "tensor":
        step = ("Each tensor's step is divided by its moving metric RMS (Adam-mini style), so "
                "`lr` is an Adam-like step.")
    else:
        where = "each output row of every layer" if rule == "graft_row" else "each tensor"
        step = (f"The step length of {where} is Adam's (Adam grafting, beta2 "
                f"{values['norm_decay']:g}, eps {values['eps']:g}), so `lr` is an Adam-like "
                "step; parameters outside linear layers (norms, scalars) take Adam's step.")
    return f"{direction} {step}"


def _optimizer_line(args: TrainingArguments) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in card_hyperparameters(args).items())
    return f"SLNB (Simple Linear Neuron Boosting, {PAPER_URL}) with {params}"


def model_card_section(args: TrainingArguments) -> str:
    """The markdown section that says what SLNB did in a run, for its model card."""
    from . import __version__

    values = card_hyperparameters(args)
    rows = "\n".join(f"| `{k}` | `{v!r}` |" for k, v in values.items())
    return (
        f"{_CARD_BEGIN}\n"
        "## Optimizer\n\n"
        "Trained with **SLNB** (Simple Linear Neuron Boosting; D. Munoz, "
        f"[arXiv:2502.01131]({PAPER_URL})), `--optim slnb` from the `hf_slnb` package "
        f"{__version__}, preset `{values['preset']}`. {describe_update(values)} Weight decay is "
        "not applied to biases and normalisation weights.\n\n"
        "The hyperparameters that acted (options without effect under these settings are "
        "not listed):\n\n"
        "| hyperparameter | value |\n|---|---|\n"
        f"{rows}\n"
        f"{_CARD_END}\n"
    )


def add_to_model_card(trainer: Any) -> None:
    """Add (or refresh) the SLNB section of the ``README.md`` in ``trainer.args.output_dir``."""
    if not trainer.is_world_process_zero():
        return
    path = os.path.join(trainer.args.output_dir, "README.md")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(re.escape(_CARD_BEGIN) + r".*?" + re.escape(_CARD_END) + r"\n?", "", text,
                  flags=re.DOTALL).rstrip("\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{text}\n\n{model_card_section(trainer.args)}")


def _extract_hyperparameters(trainer: Any) -> dict[str, Any]:
    hyperparameters = getattr(_extract_hyperparameters, _WRAPPED)(trainer)
    if _is_slnb(getattr(trainer.args, "optim", None)) and "optimizer" in hyperparameters:
        hyperparameters["optimizer"] = _optimizer_line(trainer.args)
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


# Defining SLNBTrainingArguments (above) needs no registration, but parsing it does: argparse
# takes --optim's choices from OptimizerNames when the parser is built.
check_transformers_version()
_patch_training_args(__import__("transformers.training_args", fromlist=["_"]))
