"""SLNB checkpoints: the standard ``state_dict`` plus the options that give the state its meaning.

:class:`Checkpointing` is a mixin of :class:`hf_slnb.SLNB`. ``state_dict()`` is torch.optim's,
with SLNB's options recorded in every saved parameter group (key ``"slnb"``, where
``torch.distributed.checkpoint`` keeps them). ``load_state_dict`` refuses, before loading
anything, a checkpoint written with options that give the state another meaning, or for another
model; old checkpoints (no record) are checked by their state keys.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from .config import GROUP_KEYS, STATE_OPTIONS

#: Version of the options record in ``state_dict()["param_groups"][i]["slnb"]``.
STATE_FORMAT = 1
SAVED = "slnb"
#: State keys that are counters (stored as float64 on the device since format 1 of core v2).
COUNTERS = ("step", "stat_step")
#: State options added after the record began, with the value every checkpoint written before
#: them had: a checkpoint that does not record one is compared as that value.
BEFORE_RECORDED = {"orth_rest": "adam", "lr_scale": 1.0, "rest_lr_scale": 1.0}


class Checkpointing:
    """The checkpoint side of :class:`hf_slnb.SLNB` (see the module docstring)."""

    config: Any
    param_groups: list[dict[str, Any]]
    state: Any
    skipped_steps: int

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``torch.optim``'s state dict; each parameter group also records SLNB's options."""
        self._flush_skips()
        self._publish_state()
        out = super().state_dict()  # type: ignore[misc]
        saved = {"format": STATE_FORMAT, **self.config.record(), "skipped_steps": self.skipped_steps,
                 "steps_taken": self.steps_taken}
        for group in out["param_groups"]:  # copies: the live groups are untouched
            group[SAVED] = dict(saved)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load as ``torch.optim`` does, after checking that the checkpoint fits this optimizer.

        Raises:
            ValueError: If an option that gives the state its meaning differs, or a saved state
                tensor does not have its parameter's shape; nothing is loaded then.
        """
        groups = state_dict["param_groups"]
        saved = next((g[SAVED] for g in groups if SAVED in g), None)
        self._check_saved_options(saved, state_dict["state"])
        self._check_saved_shapes(state_dict)
        changed = self._changed_hyperparameters(groups)
        if saved is not None:
            state_dict = {**state_dict, "param_groups": [
                {k: v for k, v in g.items() if k != SAVED} for g in groups]}
        super().load_state_dict(state_dict)  # type: ignore[misc]
        # torch.optim cast the state to each parameter's dtype (bf16 would lose float32
        # statistics): take the saved tensors themselves; the next step copies them in.
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(params, saved_ids):
            for key, value in (state_dict["state"].get(i) or {}).items():
                if isinstance(value, Tensor) and p in self.state:
                    self.state[p][key] = value
        if saved is not None:
            self.skipped_steps = int(saved.get("skipped_steps", 0))
            self._skips.skipped = self.skipped_steps  # type: ignore[attr-defined]
            # Older records lack it: their steps all read the inputs (cov_every came later).
            self.steps_taken = int(saved.get("steps_taken", 0))
        if changed:
            warnings.warn(
                "SLNB.load_state_dict: the checkpoint's hyperparameters replace this optimizer's "
                f"(as in torch.optim): {'; '.join(changed)}. To change one after resuming, set "
                "optimizer.param_groups[i][key] after load_state_dict.", UserWarning,
                stacklevel=2)
        self._loaded()  # type: ignore[attr-defined]
        self._want_inputs()  # type: ignore[attr-defined]

    def _check_saved_options(self, saved: dict[str, Any] | None,
                             states: dict[Any, dict[str, Any]]) -> None:
        mine = self.config.record()
        if saved is None:
            self._check_unrecorded_options(states)
            return
        if saved.get("format", 0) > STATE_FORMAT:
            raise ValueError(
                f"Cannot load this SLNB checkpoint: its format {saved['format']} is newer than "
                f"this hf_slnb's ({STATE_FORMAT}); upgrade hf_slnb to load it.")
        saved = {**BEFORE_RECORDED, **saved}
        diff = [key for key in STATE_OPTIONS if key in saved and saved[key] != mine[key]]
        if diff:
            lines = "; ".join(f"{k}: checkpoint {saved[k]!r}, this optimizer {mine[k]!r}"
                              for k in diff)
            wanted = ", ".join(f"{k}={saved[k]!r}" for k in diff)
            raise ValueError(
                f"Cannot load this SLNB checkpoint: it was written with other options, which "
                f"give its state another meaning ({lines}). Build the optimizer with the "
                f"checkpoint's options ({wanted}; in the Hugging Face Trainer the same keys in "
                "--optim_args) and load it again.")

    def _check_unrecorded_options(self, states: dict[Any, dict[str, Any]]) -> None:
        """An old checkpoint (no recorded options): its state keys show part of them."""
        keys: set[str] = set()
        for state in states.values():
            keys.update(state)
        shown: dict[str, Any] = {}
        if "momentum_buffer" in keys:
            shown["trust_region"] = (("graft", "graft_row") if "exp_avg_sq" in keys else
                                     ("tensor",) if "metric_sq" in keys else ("global",))
        if "mu" in keys:
            shown["diagonal_only"] = ("solution" not in keys,)
        shown["lr_scale"] = (BEFORE_RECORDED["lr_scale"],)  # it predates every record
        wrong = {k: v for k, v in shown.items() if getattr(self.config, k) not in v}
        if wrong:
            lines = "; ".join(f"{k}: checkpoint {' or '.join(repr(x) for x in v)}, this "
                              f"optimizer {getattr(self.config, k)!r}" for k, v in wrong.items())
            raise ValueError(
                "Cannot load this SLNB checkpoint: it does not record its options (it was "
                "written by an older hf_slnb), and its state shows options other than this "
                f"optimizer's ({lines}). Build the optimizer with the options it was trained "
                "with and load it again.")
        # Old checkpoints predate 'direction' (their diagonal_only says it) and the
        # orthogonalising directions (so 'orth_layers', 'orth_rest' and 'rest_lr_scale' pick
        # nothing for them).
        unchecked = [k for k in STATE_OPTIONS if k not in shown
                     and k not in ("orth_layers", "orth_rest", "rest_lr_scale")
                     and not (k == "direction" and "diagonal_only" in shown)]
        warnings.warn(
            "SLNB.load_state_dict: this checkpoint does not record its options (it was written "
            f"by an older hf_slnb): {', '.join(unchecked)} could not be checked and are taken "
            "to be this optimizer's.", UserWarning, stacklevel=3)

    def _check_saved_shapes(self, state_dict: dict[str, Any]) -> None:
        """Name the parameter whose saved state does not fit it (a checkpoint of another model)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)):
            return  # torch.optim reports the mismatched groups
        neuron_of = {id(n.weight): n for n in self.neurons}  # type: ignore[attr-defined]
        for gi, (group, mine) in enumerate(zip(groups, self.param_groups)):
            for k, (i, p) in enumerate(zip(group["params"], mine["params"])):
                neuron = neuron_of.get(id(p))
                for key, value in (state_dict["state"].get(i) or {}).items():
                    if not isinstance(value, Tensor) or key in COUNTERS:
                        continue
                    if key in ("mu", "nu"):
                        want = None if neuron is None else (neuron.num_features,)
                    elif key in ("input_cov", "input_inv_sqrt"):
                        want = None
                        if neuron is not None and self.direction.takes(neuron):  # type: ignore[attr-defined]
                            want = self.direction.state_shape(neuron)  # type: ignore[attr-defined]
                        elif neuron is not None:
                            raise ValueError(
                                f"Cannot load this SLNB checkpoint: it keeps an input covariance "
                                f"for parameter {self._names.get(id(p), '?')!r}, which this "  # type: ignore[attr-defined]
                                f"optimizer does not orthogonalise (direction="
                                f"{self.config.direction!r}, orth_layers="  # type: ignore[attr-defined]
                                f"{self.config.orth_layers!r}). It was written with "  # type: ignore[attr-defined]
                                "orth_layers='hidden' (the only rule before that option): build "
                                "the optimizer with orth_layers='hidden' and load it again.")
                    else:
                        want = () if key == "metric_sq" else tuple(p.shape)
                    if (want is not None and tuple(value.shape) != want
                            and key in ("input_cov", "input_inv_sqrt")):
                        raise ValueError(
                            f"Invalid state_dict: its {key!r} for parameter "
                            f"{self._names.get(id(p), '?')!r} has shape {tuple(value.shape)}, but "  # type: ignore[attr-defined]
                            f"this optimizer keeps {want} (max_block="
                            f"{self.config.max_block}: inputs wider than it are whitened in "  # type: ignore[attr-defined]
                            "diagonal blocks, (blocks, width, width); one (d, d) matrix up to "
                            "it). Build the optimizer with the checkpoint's max_block, or for "
                            "another model's checkpoint, that model.")
                    if want is not None and tuple(value.shape) != want:
                        raise ValueError(
                            f"Invalid state_dict: its {key!r} for parameter "
                            f"{self._names.get(id(p), '?')!r} (group {gi}, position {k}) has "  # type: ignore[attr-defined]
                            f"shape {tuple(value.shape)}, but this optimizer needs {want}: the "
                            "checkpoint was written for another model (or another order of "
                            "parameters).")

    def _changed_hyperparameters(self, groups: list[dict[str, Any]]) -> list[str]:
        """Per-group hyperparameters of this optimizer that the checkpoint's values replace."""
        out = []
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            for key in GROUP_KEYS:
                base, new = ((mine.get("initial_lr", mine["lr"]), saved.get("initial_lr",
                             saved.get("lr"))) if key == "lr" else (mine.get(key), saved.get(key)))
                if key in saved and base != new:
                    out.append(f"group {i} {key}={base!r} -> {new!r}")
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        for group in self.param_groups:
            for key in GROUP_KEYS:
                group.setdefault(key, self.defaults.get(key))  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "SLNB cannot be copied or pickled (copy.deepcopy, pickle, torch.save of the "
            "optimizer): it is bound to the hooks of one live model. Save opt.state_dict() "
            "instead and load it into a new SLNB built on the model with load_state_dict().")


__all__ = ["COUNTERS", "SAVED", "STATE_FORMAT", "Checkpointing"]
