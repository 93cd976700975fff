"""The model card's SLNB section: what the optimizer computed, and the hyperparameters that acted."""

from __future__ import annotations

import os
import re
from typing import Any

from transformers.training_args import TrainingArguments

from .. import PAPER_URL
from ..binding import default_preset_for
from ..config import ORTH_DIRECTIONS
from .args import HF_OPTIONS, resolved_config, slnb_optimizer_kwargs

_CARD_BEGIN = "<!-- hf_slnb:begin -->"
_CARD_END = "<!-- hf_slnb:end -->"


def card_hyperparameters(args: TrainingArguments, model: Any = None) -> dict[str, Any]:
    """The SLNB hyperparameters that acted in a run with ``args`` (given or the preset's) on
    ``model`` (which picks the preset when none is given; without it, the default preset).

    ``lr`` and ``weight_decay`` are the Trainer's. Options that do nothing under the resolved
    configuration (:meth:`hf_slnb.config.SLNBConfig.inactive`, e.g. the conjugate-gradient
    options with ``diagonal_only=True``) are left out.
    """
    kwargs = slnb_optimizer_kwargs(args)
    if model is not None and kwargs.get("preset") is None:
        kwargs["preset"] = default_preset_for(model)
    config = resolved_config({**kwargs, "lr": args.learning_rate,
                              "weight_decay": args.weight_decay})
    inactive = config.inactive()
    values: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    for option in HF_OPTIONS:
        if option.name not in inactive:
            values[option.name] = getattr(config, option.name)
    values["skip_modules"] = list(values["skip_modules"])
    return values


def describe_update(values: dict[str, Any]) -> str:
    """One paragraph saying what SLNB computed with these (resolved) hyperparameters."""
    if values.get("direction") == "whitened_orth":
        direction = (
            "The direction of each hidden linear layer is Muon's orthogonalisation in whitened "
            "coordinates, `orth(G C^-1/2) C^-1/2`, with `C` the layer's input covariance (an "
            "EMA, damped); embeddings and the output head keep the identity metric.")
    elif values.get("direction") == "diag_whitened_orth":
        direction = (
            "The direction of each hidden linear layer is Muon's orthogonalisation in "
            "diagonally whitened coordinates, `orth(G D^-1/2) D^-1/2`, with `D` SLNB's diagonal "
            "input metric; embeddings and the output head keep the identity metric.")
    elif values["diagonal_only"]:
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
    if rule == "orth":
        step = ("The whitened layers' update has RMS 0.2 `lr` (Moonlight's match to AdamW); "
                "every other parameter takes Adam's step at `lr`: one lr, AdamW's.")
    elif rule == "global":
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
    if values["lr_scale"] != 1.0:
        step = step.replace("`lr`", "`lr_scale * lr`").replace(": one lr, AdamW's.", ".") + (
            f" Every step is taken at `lr_scale * lr` = {values['lr_scale']:g} x {values['lr']:g}"
            " (weight decay too); `lr` is the one AdamW would be given.")
    if values.get("rest_lr_scale", 1.0) != 1.0 and values["direction"] in ORTH_DIRECTIONS:
        step += (f" The parameters it does not orthogonalise step at `rest_lr_scale` = "
                 f"{values['rest_lr_scale']:g} times that.")
    return f"{direction} {step}"


def optimizer_line(args: TrainingArguments, model: Any = None) -> str:
    """The card's ``optimizer`` hyperparameter: SLNB and the hyperparameters that acted."""
    params = ", ".join(f"{k}={v!r}" for k, v in card_hyperparameters(args, model).items())
    return f"SLNB (Simple Linear Neuron Boosting, {PAPER_URL}) with {params}"


def model_card_section(args: TrainingArguments, model: Any = None) -> str:
    """The markdown section that says what SLNB did in a run, for its model card."""
    from .. import __version__

    values = card_hyperparameters(args, model)
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
        f.write(f"{text}\n\n{model_card_section(trainer.args, trainer.model)}")


__all__ = ["add_to_model_card", "card_hyperparameters", "describe_update", "model_card_section",
           "optimizer_line"]
