"""Step rules: how SLNB scales its update direction, registered by ``trust_region`` name.

Each rule knows the state keys it owns and whether ``lr`` is a trust-region radius, so that
callers (the HF glue, the scripts) ask the rule instead of comparing strings. The maths still
lives in :class:`hf_slnb.SLNB` (``_tensor_scales``, ``_graft``); moving it here is the next step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepRule:
    """One step rule: its option name, the per-parameter state keys it owns, what ``lr`` means."""

    name: str
    state_keys: tuple[str, ...]
    lr_is_radius: bool
    per_row: bool = False


#: The rules by their user-facing ``trust_region`` name (the one place mapping names to rules).
STEP_RULES: dict[str, StepRule] = {}


def register_step_rule(rule: StepRule) -> StepRule:
    """Register ``rule`` under its name; ``ValueError`` if the name is taken."""
    if rule.name in STEP_RULES:
        raise ValueError(f"Invalid step rule name {rule.name!r}: already registered.")
    STEP_RULES[rule.name] = rule
    return rule


GLOBAL_RADIUS = register_step_rule(StepRule("global", (), lr_is_radius=True))
TENSOR_RMS = register_step_rule(StepRule("tensor", ("metric_sq",), lr_is_radius=False))
ADAM_GRAFT = register_step_rule(StepRule("graft", ("exp_avg_sq",), lr_is_radius=False))
ADAM_GRAFT_ROW = register_step_rule(
    StepRule("graft_row", ("exp_avg_sq",), lr_is_radius=False, per_row=True))


def step_rule(name: str) -> StepRule:
    """The registered rule called ``name``, or ``ValueError`` listing the allowed names."""
    if name not in STEP_RULES:
        raise ValueError(f"Invalid trust_region={name!r}: must be one of {tuple(STEP_RULES)}.")
    return STEP_RULES[name]
