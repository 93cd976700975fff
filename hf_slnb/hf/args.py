"""SLNB's Trainer options: :class:`SLNBTrainingArguments` and ``--optim_args``.

Both are generated from :data:`hf_slnb.config.OPTIONS`: one ``slnb_<name>`` field and one
``--optim_args`` key per option (the option's type, allowed values and help text), except
``lr`` and ``weight_decay``, which are the Trainer's ``--learning_rate`` and ``--weight_decay``.
A field left at ``None`` passes nothing to :class:`~hf_slnb.SLNB`, which then takes the
preset's value; ``--help`` says what that is for each preset.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers.training_args import OptimizerNames, TrainingArguments

from ..config import DEFAULT_PRESET, FALLBACK_PRESET, OPTIONS, PRESETS, Option, SLNBConfig, resolve

#: The value of ``--optim`` that selects SLNB.
OPTIM_NAME = "slnb"
#: SLNB options the Trainer sets itself, with the flag that sets them.
TRAINER_OPTIONS = {"lr": "--learning_rate", "weight_decay": "--weight_decay"}
#: The options that get a ``slnb_*`` field and an ``--optim_args`` key.
HF_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.name not in TRAINER_OPTIONS)

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")
# argparse's ArgumentDefaultsHelpFormatter appends "(default: None)" to a help text unless it
# mentions %(default); this mention expands to nothing (the help says the presets' values).
_NO_ARGPARSE_DEFAULT = "%(default).0s"


def resolved_config(kwargs: dict[str, Any]) -> SLNBConfig:
    """The configuration :class:`~hf_slnb.SLNB` will run with these keyword arguments.

    Without a preset (the model's, unknown here) it is the transformer default's, or the other
    default's where only that one accepts the options.

    Raises:
        ValueError: For an unknown preset or option or a bad value, prefixed ``--optim slnb:``.
    """
    given = {k: v for k, v in kwargs.items() if v is not None}
    presets = [given.pop("preset")] if "preset" in given else [DEFAULT_PRESET, FALLBACK_PRESET]
    first: ValueError | None = None
    for preset in presets:
        try:
            return resolve(preset, **given)[0]
        except ValueError as err:
            first = first or err
    raise ValueError(f"--optim slnb: {first}") from None


def resolved_option(name: str, kwargs: dict[str, Any]) -> Any:
    """The value :class:`~hf_slnb.SLNB` will use for ``name`` given these keyword arguments."""
    return getattr(resolved_config(kwargs), name)


# ---------------------------------------------------------------------------------------------
# Typed options
# ---------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(value) if value else "none"
    return str(value)


def _help(option: Option) -> str:
    """``--help`` text of one option's field: its meaning and the presets' values."""
    text = f"SLNB: {option.help}".replace("%", "%%")
    if option.name == "preset":
        return (f"{text} (default: the model's: {DEFAULT_PRESET} for a transformer, "
                f"{FALLBACK_PRESET} otherwise){_NO_ARGPARSE_DEFAULT}")
    presets = ", ".join(f"{name} {_show(getattr(config, option.name))}"
                        for name, config in PRESETS.items())
    return f"{text} (default: the preset's: {presets}){_NO_ARGPARSE_DEFAULT}"


_FIELD_TYPES: dict[type, Any] = {float: float | None, int: int | None, bool: bool | None,
                                 str: str | None, list: list[str] | None}


def _add_option_fields(cls: type) -> type:
    """Add one ``slnb_<name>`` field per option in :data:`HF_OPTIONS` (before ``@dataclass``)."""
    annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 - this class only
    for option in HF_OPTIONS:
        name = f"slnb_{option.name}"
        metadata: dict[str, Any] = {"help": _help(option)}
        if option.choices is not None:
            metadata["choices"] = list(option.choices)
        annotations[name] = _FIELD_TYPES[option.kind]
        setattr(cls, name, field(default=None, metadata=metadata))
    cls.__annotations__ = annotations
    return cls


@dataclass
@_add_option_fields
class SLNBTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with ``optim="slnb"`` by default and one field per SLNB option.

    The fields are ``slnb_<name>`` for every option of :data:`hf_slnb.config.OPTIONS` but
    ``lr`` and ``weight_decay``, which are the Trainer's own ``--learning_rate`` and
    ``--weight_decay``. Every field defaults to ``None``: nothing is passed to SLNB, so the
    preset is the model's (``'whitened'`` for a transformer, ``'graft'`` otherwise) and every
    other option the preset's value. When ``--learning_rate`` is left
    at its default and lr is a trust-region radius (``--slnb_preset paper``), SLNB's default lr
    is used (see the README). A key given in ``--optim_args`` overrides the ``slnb_*`` field of
    the same name (a warning says so when the field was set too).
    """

    optim: OptimizerNames | str = field(
        default=OPTIM_NAME,
        metadata={"help": "The optimizer to use; 'slnb' (the default here) for SLNB. See "
                  "`OptimizerNames` for the complete list."},
    )
    learning_rate: float = field(
        default=5e-5,
        metadata={"help": "The initial learning rate. With --optim slnb's presets 'whitened' "
                  "(the default for a transformer: it steps at 10x this lr, its map from AdamW's) "
                  "and 'graft' it is the lr AdamW would be given. With --slnb_preset paper it is "
                  "SLNB's trust-region radius (the length of each update in the metric), and left "
                  f"at 5e-05 (Adam's default) the paper's lr ({PRESETS['paper'].lr}) is used "
                  "instead."},
    )
    optim_args: str | None = field(
        default=None,
        metadata={"help": "With --optim slnb: SLNB options as comma-separated key=value pairs, "
                  "e.g. 'preset=paper,cg_iters=4'; the keys are the --slnb_* options without "
                  "the prefix, and a key given here wins over its --slnb_* flag. Other "
                  "optimizers read their own keys."},
    )

    def __post_init__(self) -> None:
        from .patch import register

        register()
        super().__post_init__()


# ---------------------------------------------------------------------------------------------
# --optim_args
# ---------------------------------------------------------------------------------------------
_EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number",
             list: "a regular expression", str: "a string"}


def _option_types() -> dict[str, type]:
    """``--optim_args`` key -> the option's Python type (``list`` is a list of regexes)."""
    return {o.name: o.kind for o in HF_OPTIONS}


def _convert(key: str, raw: str, kind: type) -> Any:
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
        if kind is list:
            if not text:
                raise ValueError
            return [text]
        return text
    except ValueError:
        raise ValueError(
            f"Invalid --optim_args value {key}={raw!r} for --optim slnb: must be "
            f"{_EXPECTED.get(kind, 'a string')}."
        ) from None


def parse_optim_args(optim_args: str | None) -> dict[str, Any]:
    """Parse ``--optim_args "key=value,..."`` into typed SLNB options.

    Keys are the names of :data:`hf_slnb.config.OPTIONS` (the ``--slnb_*`` flags without the
    prefix) except ``lr`` and ``weight_decay``. Booleans are ``true``/``false``;
    ``skip_modules`` is one regular expression (use ``|`` for several). Values cannot contain
    ``,`` or ``=`` (transformers splits the string on them).

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
        if key in (*TRAINER_OPTIONS, "learning_rate"):
            flag = TRAINER_OPTIONS.get(key, "--learning_rate")
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


def _field_default(name: str) -> Any:
    return SLNBTrainingArguments.__dataclass_fields__[f"slnb_{name}"].default


def slnb_optimizer_kwargs(args: TrainingArguments, *, warn: bool = False) -> dict[str, Any]:
    """The :class:`~hf_slnb.SLNB` keyword arguments (besides ``lr``/``weight_decay``) asked for.

    Options come from the ``slnb_*`` fields of :class:`SLNBTrainingArguments` that are set
    (not ``None``) and from ``--optim_args``; a key in ``--optim_args`` wins. Options given
    nowhere are left out, so they take the preset's value.

    Args:
        args: Any ``TrainingArguments`` (subclass) instance.
        warn: Warn when an ``--optim_args`` key overrides a changed ``slnb_*`` field. The
            arguments are resolved several times (lr, validation, the optimizer, the card):
            only the validation, once per ``TrainingArguments``, warns.

    Returns:
        Keyword arguments for :class:`~hf_slnb.SLNB`.

    Raises:
        ValueError: For a bad ``--optim_args`` string.
    """
    kwargs: dict[str, Any] = {}
    if isinstance(args, SLNBTrainingArguments):
        for name in _option_types():
            value = getattr(args, f"slnb_{name}", None)
            if value is not None:
                kwargs[name] = value
    for key, value in parse_optim_args(args.optim_args).items():
        if (warn and key in kwargs and kwargs[key] != value
                and kwargs[key] != _field_default(key)):
            warnings.warn(
                f"--optim_args {key}={value!r} overrides --slnb_{key}={kwargs[key]!r}.",
                UserWarning,
                stacklevel=2,
            )
        kwargs[key] = value
    if "skip_modules" in kwargs:
        kwargs["skip_modules"] = tuple(kwargs["skip_modules"])
    return kwargs


__all__ = [
    "DEFAULT_PRESET",
    "HF_OPTIONS",
    "OPTIM_NAME",
    "TRAINER_OPTIONS",
    "SLNBTrainingArguments",
    "parse_optim_args",
    "resolved_config",
    "resolved_option",
    "slnb_optimizer_kwargs",
]
