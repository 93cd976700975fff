"""The SLNB optimizer: gradient descent with every linear layer's inputs whitened in the metric."""

from __future__ import annotations

import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim import Optimizer

from . import distributed, hooks
from .distributed import is_dtensor, local
from .functional import Vec, bias_corrected, conjugate_gradient, dot, preconditioner_terms
from .layers import (
    BACKENDS,
    LinearNeuron,
    Neuron,
    _is_hf_conv1d,
    neuron_for,
    stat_dtype,
)
from .step_rules import STEP_RULES

PAPER_URL = "https://arxiv.org/abs/2502.01131"

# Hyperparameters that may differ between parameter groups, with their checks.
RIDGE_MODES = ("absolute", "relative")

#: Values of the hyperparameters a preset sets (any of them given explicitly wins).
#: ``paper`` is ALGORITHM.md exactly; ``graft`` (the default) is chosen by the ablations in
#: BENCHMARKS.md: SLNB's diagonal incomplete-Cholesky direction with Adam's step size per
#: output row (its ridge settings apply when ``diagonal_only=False`` is asked for).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"lr": 0.1, "ridge": 0.1, "ridge_mode": "absolute", "trust_region": "global",
              "diagonal_only": False, "precondition_embeddings": True},
    "graft": {"lr": 3e-3, "ridge": 1.0, "ridge_mode": "relative", "trust_region": "graft_row",
              "diagonal_only": True, "precondition_embeddings": True},
}
TRUST_REGIONS = tuple(STEP_RULES)  # the registered step rules, in one place
#: Options that give the optimizer state its meaning (its buffers, what ``ridge`` and the
#: second moments mean, which layers keep statistics): a checkpoint loads only into an optimizer
#: built with the same values.
STATE_OPTIONS = ("preset", "trust_region", "ridge_mode", "diagonal_only",
                 "precondition_embeddings", "skip_modules", "norm_decay")
#: Options recorded in a checkpoint that may change on resume (how the next steps are solved
#: or floored); the loading optimizer's own values are used.
FREE_OPTIONS = ("metric_backend", "min_norm", "eps", "cg_tol")
#: Version of the options record in ``state_dict()["param_groups"][i]["slnb"]``.
STATE_FORMAT = 1
_SAVED = "slnb"
_GROUP_KEYS = ("lr", "weight_decay", "momentum", "mean_decay", "sq_mean_decay", "shrinkage",
               "ridge", "cg_iters")


def _check_group(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of a parameter group."""

    def real(key: str) -> float:
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Invalid {key}={value!r}{where}: must be a real number.")
        if not math.isfinite(value):
            raise ValueError(f"Invalid {key}={value!r}{where}: must be finite.")
        return float(value)

    for key, low, high, closed in (
        ("momentum", 0.0, 1.0, False),
        ("mean_decay", 0.0, 1.0, False),
        ("sq_mean_decay", 0.0, 1.0, False),
        ("shrinkage", 0.0, 1.0, False),
    ):
        v = real(key)
        if not (low <= v < high):
            raise ValueError(f"Invalid {key}={v!r}{where}: must be in [{low}, {high}).")
    for key in ("lr", "weight_decay", "ridge"):
        if real(key) < 0.0:
            raise ValueError(f"Invalid {key}={group[key]!r}{where}: must be >= 0.")
    iters = group["cg_iters"]
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"Invalid cg_iters={iters!r}{where}: must be an integer >= 0.")


def _compile_skip_modules(skip_modules: Any) -> list[re.Pattern[str]]:
    """``skip_modules`` as compiled patterns, or ``ValueError`` naming the bad entry."""
    if isinstance(skip_modules, (str, re.Pattern)):
        skip_modules = (skip_modules,)
    if not isinstance(skip_modules, Iterable):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError here, whatever its type
            f"Invalid skip_modules={skip_modules!r}: must be a sequence of regular expressions "
            "(strings), e.g. ('lm_head',); () for none.")
    patterns = []
    for pattern in skip_modules:
        if not isinstance(pattern, (str, re.Pattern)) or not isinstance(
                getattr(pattern, "pattern", pattern), str):
            raise ValueError(  # noqa: TRY004 - as above
                f"Invalid skip_modules entry {pattern!r}: must be a regular expression (a string).")
        try:
            patterns.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(
                f"Invalid skip_modules entry {pattern!r}: must be a regular expression ({err})."
            ) from None
    return patterns


def _warn_cg_iters(group: dict[str, Any], index: int, diagonal_only: bool) -> None:
    if group["cg_iters"] == 0 and not diagonal_only:
        warnings.warn(
            f"SLNB with cg_iters=0 and diagonal_only=False keeps every neuron's warm start "
            f"(zero): neurons in parameter group {index} move only by weight decay. Use "
            "diagonal_only=True for h = P g.", UserWarning, stacklevel=3)


class SLNB(Optimizer):
    r"""Simple Linear Neuron Boosting (D. Munoz, arXiv 2502.01131), online variant.

    For every layer linear in its parameters (``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face
    ``Conv1D``, ``nn.Embedding``) the gradient is preconditioned by the inverse second moment of
    the layer's input features, solved by a few warm-started preconditioned conjugate-gradient
    (PCG) iterations; every other parameter uses the identity metric. The whole update has unit
    length under that metric, so ``lr`` is a trust-region radius:

    .. math::
        \begin{aligned}
            &m_t \leftarrow \beta_g m_{t-1} + (1-\beta_g)\nabla_t, \qquad
              g_t = m_t / (1-\beta_g^t) \\
            &h_t \approx \big(J^\top J / N + \gamma I_W\big)^{-1} g_t
              \quad\text{(PCG, preconditioner from EMAs of } x, x^2\text{)} \\
            &n_t = \sqrt{\max(\nu_{min}^2, \textstyle\sum_p \langle h_t, g_t\rangle)} \\
            &\theta_t \leftarrow \theta_{t-1} - \eta\,(h_t / n_t + \lambda\,\theta_{t-1})
        \end{aligned}

    The exact definition is ``ALGORITHM.md``; conventions where it leaves room are in the
    README ("How SLNB is defined here").

    Args:
        params: Parameters or parameter groups, as for any ``torch.optim`` optimizer. Groups
            may override ``lr``, ``weight_decay``, ``momentum``, ``mean_decay``,
            ``sq_mean_decay``, ``shrinkage``, ``ridge`` and ``cg_iters`` (a neuron uses its
            weight's group).
        model: The module whose layers are hooked to capture their inputs. It must own every
            parameter in ``params``.
        preset: ``"graft"`` (default) or ``"paper"``: the values of ``lr``, ``ridge``,
            ``ridge_mode``, ``trust_region``, ``diagonal_only`` and ``precondition_embeddings``
            left at ``None``.
            ``"paper"`` is the published algorithm (ALGORITHM.md) exactly: ``lr=0.1``,
            ``ridge=0.1``, absolute ridge, one global trust region, PCG. ``"graft"`` keeps
            SLNB's diagonal preconditioner and takes Adam's step size per output row:
            ``lr=3e-3``, ``trust_region="graft_row"``, ``diagonal_only=True`` (and ``ridge=1.0``,
            relative, for PCG if ``diagonal_only=False`` is given). BENCHMARKS.md has the
            ablations behind it.
        lr: With ``trust_region="global"`` the trust-region radius of the step (the metric
            length of the update, 0.05-1 is reasonable); with the graft and tensor regions an
            Adam-like per-element step. ``>= 0``. Default: the preset's.
        momentum: Decay ``beta_g`` of the gradient's moving average, in ``[0, 1)``. Default 0.9.
        mean_decay: Decay of the feature-mean EMA, in ``[0, 1)``. Default 0.9.
        sq_mean_decay: Decay of the feature-mean-square EMA, in ``[0, 1)``. Default 0.999.
        shrinkage: Share ``s`` of the mean variance mixed into each feature's variance in the
            preconditioner, in ``[0, 1)``. Default 0.1.
        ridge: ``gamma``, added to the metric on weights (never biases), ``>= 0``. Default: the
            preset's (paper 0.1, graft 1.0).
        cg_iters: PCG iterations per neuron and step, integer ``>= 0`` (0 keeps the warm
            start). Default 2.
        min_norm: Floor of the step's metric norm ``n``, ``> 0``. Default ``1e-2``.
        weight_decay: Decoupled weight decay ``lambda``, ``>= 0``. Default ``1e-4``.
        diagonal_only: Skip PCG and use ``h = P g`` (no second moments, no PCG: about the cost
            of AdamW). Default: the preset's (paper False, graft True).
        precondition_embeddings: Give ``nn.Embedding`` its exact one-hot metric (a diagonal of
            token frequencies); otherwise embeddings use the identity metric (with the graft
            trust regions: Adam's step). Default: the preset's (paper True, graft True).
        skip_modules: Regular expressions; a module whose qualified name matches one
            (``re.search``) gets the identity metric. Default none.
        metric_backend: ``"auto"`` (per layer and step, by estimated flops), ``"explicit"``
            (accumulate ``sum x x^T`` in the hook) or ``"matrix_free"`` (keep the inputs and
            apply ``J^T J`` in each PCG iteration). Both are exact. Default ``"auto"``.
        cg_tol: PCG stops before an iteration once ``|r| <= cg_tol |g|``, ``>= 0``.
            Default ``1e-5``.
        ridge_mode: ``"absolute"`` (the paper: ``gamma = ridge``) or ``"relative"``
            (``gamma = ridge * mean(nu)``, the layer's mean feature second moment, so that the
            metric is invariant to a rescaling of a layer's inputs). Default: the preset's.
        trust_region: ``"global"`` (the paper: one unit step under the metric for the whole
            model, ``lr`` is its radius) or ``"tensor"`` (each parameter tensor is divided by
            ``sqrt(EMA(<h, g> / numel))``, a per-tensor metric RMS as in Adam-mini, so ``lr`` is
            an Adam-like per-element step), or ``"graft"`` (Adam grafting, as in Distributed
            Shampoo: each tensor's step has the norm Adam's step would have and SLNB's
            direction; identity-metric parameters take Adam's step; ``lr`` is Adam's, and one
            more state buffer per parameter is kept), or ``"graft_row"`` (the same with Adam's
            norm per output unit's row of each layer's weight). Default: the preset's.
        norm_decay: EMA decay of the per-tensor metric RMS (``"tensor"``) or of Adam's squared
            gradients (``"graft"``), in ``[0, 1)``. Default 0.999.
        eps: Added to that RMS (``"tensor"``, ``"graft"``), ``> 0``. Default ``1e-8``.
        process_group: ``torch.distributed`` group over which statistics are summed in data
            parallel training (default: the world, when initialised).

    Fully sharded data parallel (FSDP2, ``fully_shard``) is supported: build the optimizer after
    sharding, from the sharded parameters. Every rank sums the statistics of its own batch as in
    plain data parallel. An ``nn.Linear`` (weight sharded along its output rows, which share one
    metric) is preconditioned shard by shard, and so are HF ``Conv1D`` and embeddings with the
    diagonal preconditioner (their shards are input features); other layers gather their
    gradient for the solve and keep their shard of the result. The optimizer state is sharded
    like the parameters.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        preset: str = "graft",
        lr: float | None = None,
        momentum: float = 0.9,
        mean_decay: float = 0.9,
        sq_mean_decay: float = 0.999,
        shrinkage: float = 0.1,
        ridge: float | None = None,
        cg_iters: int = 2,
        min_norm: float = 1e-2,
        weight_decay: float = 1e-4,
        diagonal_only: bool | None = None,
        precondition_embeddings: bool | None = None,
        skip_modules: Sequence[str] = (),
        metric_backend: str = "auto",
        cg_tol: float = 1e-5,
        ridge_mode: str | None = None,
        trust_region: str | None = None,
        norm_decay: float = 0.999,
        eps: float = 1e-8,
        process_group: object | None = None,
    ) -> None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"Invalid preset={preset!r}: must be one of {tuple(PRESETS)}.")
        for key, flag in (("diagonal_only", diagonal_only),
                          ("precondition_embeddings", precondition_embeddings)):
            if flag is not None and not isinstance(flag, bool):  # bool("false") is True
                raise ValueError(f"Invalid {key}={flag!r}: must be True or False (or None for "
                                 "the preset's value).")
        chosen = PRESETS[preset]
        lr = chosen["lr"] if lr is None else lr
        ridge = chosen["ridge"] if ridge is None else ridge
        ridge_mode = chosen["ridge_mode"] if ridge_mode is None else ridge_mode
        trust_region = chosen["trust_region"] if trust_region is None else trust_region
        diagonal_only = chosen["diagonal_only"] if diagonal_only is None else diagonal_only
        if precondition_embeddings is None:
            precondition_embeddings = chosen["precondition_embeddings"]
        self.preset = preset
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, mean_decay=mean_decay,
            sq_mean_decay=sq_mean_decay, shrinkage=shrinkage, ridge=ridge, cg_iters=cg_iters,
        )
        _check_group(defaults, "")
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model={model!r}: must be the torch.nn.Module being trained.")
        if isinstance(min_norm, bool) or not isinstance(min_norm, (int, float)) or not (
            min_norm > 0 and math.isfinite(min_norm)
        ):
            raise ValueError(f"Invalid min_norm={min_norm!r}: must be a finite number > 0.")
        if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not (
            cg_tol >= 0 and math.isfinite(cg_tol)
        ):
            raise ValueError(f"Invalid cg_tol={cg_tol!r}: must be a finite number >= 0.")
        if trust_region not in TRUST_REGIONS:
            raise ValueError(
                f"Invalid trust_region={trust_region!r}: must be one of {TRUST_REGIONS}.")
        if isinstance(norm_decay, bool) or not isinstance(norm_decay, (int, float)) or not (
            0.0 <= norm_decay < 1.0
        ):
            raise ValueError(f"Invalid norm_decay={norm_decay!r}: must be in [0.0, 1.0).")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            eps > 0 and math.isfinite(eps)
        ):
            raise ValueError(f"Invalid eps={eps!r}: must be a finite number > 0.")
        if ridge_mode not in RIDGE_MODES:
            raise ValueError(f"Invalid ridge_mode={ridge_mode!r}: must be one of {RIDGE_MODES}.")
        if metric_backend not in BACKENDS:
            raise ValueError(f"Invalid metric_backend={metric_backend!r}: must be one of {BACKENDS}.")
        patterns = _compile_skip_modules(skip_modules)
        super().__init__(params, defaults)  # add_param_group validates every group
        for i, group in enumerate(self.param_groups):
            _warn_cg_iters(group, i, bool(diagonal_only))

        self.model = model
        self.min_norm = float(min_norm)
        self.cg_tol = float(cg_tol)
        self.diagonal_only = bool(diagonal_only)
        self.precondition_embeddings = bool(precondition_embeddings)
        self.skip_modules = tuple(p.pattern for p in patterns)
        self.metric_backend = metric_backend
        self.ridge_mode = ridge_mode
        self.trust_region = trust_region
        self.norm_decay = float(norm_decay)
        self.eps = float(eps)
        self.process_group = process_group
        self.skipped_steps = 0
        self._last: dict[str, Tensor | float] = {}
        self._names = self._parameter_names(model)
        self._shard_group = self._check_sharding()
        self._check_layers(model, patterns, set(self._current_param_ids()))
        self.neurons: list[Neuron] = self._find_neurons(model, patterns)
        self._index_neurons()
        self._param_ids = self._current_param_ids()
        self._install_hooks(self.neurons)

    # -- construction -----------------------------------------------------------------------
    def _parameter_names(self, model: nn.Module) -> dict[int, str]:
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"Invalid params: a parameter of shape {tuple(p.shape)} in group {i} is "
                        f"not owned by model={type(model).__name__}; SLNB can only precondition "
                        "parameters of the model it hooks."
                    )
        return names

    def _check_sharding(self) -> object | None:
        """The process group of FSDP2-sharded parameters (``None`` when nothing is sharded)."""
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                pg = distributed.check_sharding(p, self._names.get(id(p), "?"))
                if pg is not None and all(pg is not g for g in groups):
                    groups.append(pg)
        if len(groups) > 1:
            raise ValueError(f"Invalid params: sharded over {len(groups)} different process "
                             "groups; SLNB supports one FSDP2 mesh per optimizer.")
        return groups[0] if groups else None

    def _find_neurons(self, model: nn.Module, patterns: list[re.Pattern[str]]) -> list[Neuron]:
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        by_weight: dict[int, list[Neuron]] = {}
        for name, module in model.named_modules():
            if any(p.search(name) for p in patterns) or parametrize.is_parametrized(module,
                                                                                     "weight"):
                continue  # reading a parametrized weight computes it: see _check_layers
            neuron = neuron_for(name, module, self.precondition_embeddings, self.metric_backend)
            if neuron is None or id(neuron.weight) not in mine:
                continue
            if neuron.bias is not None and id(neuron.bias) not in mine:
                neuron.bias = None  # a frozen bias: the neuron is bias-free
            by_weight.setdefault(id(neuron.weight), []).append(neuron)
        chosen = []
        for owners in by_weight.values():
            # A tied weight (GPT-2's wte / lm_head) takes the metric of its non-embedding owner.
            owners.sort(key=lambda n: n.kind == "embedding")
            chosen.append(owners[0])
        return chosen

    def _check_layers(self, model: nn.Module, patterns: list[re.Pattern[str]],
                      ids: set[int]) -> None:
        """Refuse sparse embeddings; warn once about layers whose weight is computed.

        Args:
            model: The hooked model.
            patterns: The compiled ``skip_modules``.
            ids: Parameters to check (the new group's in :meth:`add_param_group`).
        """
        computed = []
        kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
        if self.precondition_embeddings:
            kinds += (nn.Embedding,)
        for name, module in model.named_modules():
            # A parametrized weight is computed on access (spectral_norm even updates its
            # buffers then): recognise it without reading it.
            if parametrize.is_parametrized(module, "weight"):
                weight = None
            else:
                weight = getattr(module, "weight", None)
                if (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
                        and id(weight) in ids):
                    raise ValueError(
                        f"Invalid model: module {name!r} is {type(module).__name__}"
                        "(sparse=True), whose sparse gradients SLNB does not support; build it "
                        "with sparse=False or leave its weight out of params.")
                if not isinstance(weight, Tensor) or isinstance(weight, nn.Parameter):
                    continue  # no weight, or a parameter: not computed
            if any(p.search(name) for p in patterns) or not (
                    isinstance(module, kinds) or _is_hf_conv1d(module)):
                continue
            if {id(q) for q in module.parameters()} & ids:
                computed.append(name)  # parametrize / weight_norm: the weight is not a leaf
        if computed:
            warnings.warn(
                f"SLNB gives the identity metric to {', '.join(repr(n) for n in computed)}: "
                "their weight is computed from other parameters (torch.nn.utils.parametrize, "
                "weight_norm), so the metric of their inputs does not apply to the parameters "
                "trained. Remove the parametrization (torch.nn.utils.parametrize."
                "remove_parametrizations) to precondition them.", UserWarning, stacklevel=3)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, validated as the constructor's are; its layers are hooked.

        Raises:
            ValueError: For a bad hyperparameter (the constructor's message), a parameter the
                model does not own, or a sparse embedding; the group is then not added.
        """
        index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group, f" in parameter group {index}")
            if not hasattr(self, "neurons"):
                return  # called by Optimizer.__init__: the constructor finds the layers
            self._names = self._parameter_names(self.model)
            self._shard_group = self._check_sharding()
            patterns = [re.compile(p) for p in self.skip_modules]
            self._check_layers(self.model, patterns, {id(p) for p in group["params"]})
        except ValueError:
            self.param_groups.pop()
            raise
        _warn_cg_iters(group, index, self.diagonal_only)
        known = {id(n.weight) for n in self.neurons}
        new = [n for n in self._find_neurons(self.model, patterns) if id(n.weight) not in known]
        mine = set(self._current_param_ids())
        for n in self.neurons:  # a hooked layer whose bias joins with this group
            bias = getattr(n.module, "bias", None)
            if n.bias is None and isinstance(bias, Tensor) and id(bias) in mine:
                n.bias = bias
        self.neurons.extend(new)
        self._index_neurons()
        self._param_ids = self._current_param_ids()
        self._install_hooks(new)

    def _index_neurons(self) -> None:
        self._neuron_of = {id(n.weight): n for n in self.neurons}
        self._bias_owner = {id(n.bias): n for n in self.neurons if n.bias is not None}

    def _current_param_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for g in self.param_groups for p in g["params"])

    def _follow_replaced_params(self) -> None:
        """Rebind the layers to parameters replaced after construction.

        Accelerate prepares an FSDP2 model after the Trainer has built the optimizer: it shards
        the model, which replaces every parameter, and swaps the new ones into the parameter
        groups. The hooked modules stay; their weights are looked up again.
        """
        ids = self._current_param_ids()
        if ids == self._param_ids:
            return
        self._param_ids = ids
        self._names = self._parameter_names(self.model)
        self._shard_group = self._check_sharding()
        mine = set(ids)
        for n in self.neurons:
            weight = getattr(n.module, "weight", None)
            if isinstance(weight, Tensor):
                n.weight = weight
            bias = getattr(n.module, "bias", None)
            n.bias = bias if isinstance(bias, Tensor) and id(bias) in mine else None
        self._index_neurons()

    def _install_hooks(self, neurons: list[Neuron]) -> None:
        """Hook ``neurons``' modules (see :mod:`hf_slnb.hooks`: weak, picklable, one owner each).

        The hooks hold this optimizer weakly and are removed when it is garbage-collected. A
        module already hooked by another live SLNB optimizer is taken over, with a warning;
        that optimizer then refuses to step.
        """
        if not hasattr(self, "_hooks"):
            self._handles: list[Any] = []
            self._hooks: list[hooks.CaptureHook] = []
            self._hooks_taken: list[str] = []
            self._uncaptured_warned: set[str] = set()
            # The finalizer holds the lists, not the optimizer: a discarded optimizer is freed.
            self._finalizer = weakref.finalize(self, hooks.remove, self._handles, self._hooks)
        taken = hooks.install(self, self.model, neurons, self._handles, self._hooks)
        if taken:
            shown = ", ".join(repr(t) for t in taken[:5]) + (" ..." if len(taken) > 5 else "")
            warnings.warn(
                f"SLNB: {len(taken)} module(s) of this model were hooked by an earlier SLNB "
                f"optimizer that is still alive ({shown}); their hooks now belong to the new "
                "optimizer, and the earlier one refuses to step. Call remove_hooks() on an "
                "optimizer you no longer use.", UserWarning, stacklevel=3)

    def _world_size(self) -> int:
        return distributed.world_size(self.process_group)

    def remove_hooks(self) -> None:
        """Detach SLNB from the model (the optimizer then falls back to the identity metric)."""
        hooks.remove(self._handles, self._hooks)
        self.clear_captures()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as ``torch.optim`` does, and drop the inputs captured with them.

        A step skipped by ``torch.amp.GradScaler`` or a discarded batch leaves captures behind;
        the next step must see only the inputs of its own gradients. (``model.zero_grad()``,
        which the Trainer calls, sets gradients to ``None``: the hooks notice that instead.)
        """
        super().zero_grad(set_to_none=set_to_none)
        self.clear_captures()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "SLNB cannot be copied or pickled (copy.deepcopy, pickle, torch.save of the "
            "optimizer): it is bound to the hooks of one live model. Save opt.state_dict() "
            "instead and load it into a new SLNB built on the model with load_state_dict().")

    def clear_captures(self) -> None:
        """Drop the inputs captured since the last step."""
        for n in self.neurons:
            n.capture = None

    # -- checkpoint -------------------------------------------------------------------------
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key in _GROUP_KEYS:
                group.setdefault(key, self.defaults.get(key))

    def _options(self) -> dict[str, Any]:
        """The optimizer-level options a checkpoint records (plain Python values)."""
        return {key: list(getattr(self, key)) if key == "skip_modules" else getattr(self, key)
                for key in (*STATE_OPTIONS, *FREE_OPTIONS)}

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict; each parameter group also records SLNB's options.

        They are under the key ``"slnb"`` of every saved group (where
        ``torch.distributed.checkpoint`` keeps them, as it keeps a group's hyperparameters),
        with the format version and :attr:`skipped_steps`.
        """
        out = super().state_dict()
        saved = {"format": STATE_FORMAT, **self._options(), "skipped_steps": self.skipped_steps}
        for group in out["param_groups"]:  # copies: the live groups are untouched
            group[_SAVED] = dict(saved)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim`` does, after checking that the checkpoint fits this optimizer.

        The options in :data:`STATE_OPTIONS` give the state its meaning and must equal the
        checkpoint's; those in :data:`FREE_OPTIONS` are this optimizer's own (they change only
        how the next steps are computed). The checkpoint's per-group hyperparameters replace
        this optimizer's, as in ``torch.optim``; a warning names those that differ. Statistics
        are kept in float32 for low-precision weights.

        Raises:
            ValueError: If an option of :data:`STATE_OPTIONS` differs, or a saved state tensor
                does not have its parameter's shape (a checkpoint of another model); nothing is
                loaded then.
        """
        groups = state_dict["param_groups"]
        saved = next((g[_SAVED] for g in groups if _SAVED in g), None)
        self._check_saved_options(saved, state_dict["state"])
        self._check_saved_shapes(state_dict)
        changed = self._changed_hyperparameters(groups)
        if saved is not None:  # the options are the optimizer's, not the groups'
            state_dict = {**state_dict, "param_groups": [
                {k: v for k, v in g.items() if k != _SAVED} for g in groups]}
        super().load_state_dict(state_dict)
        if saved is not None:
            self.skipped_steps = int(saved.get("skipped_steps", 0))
        if changed:
            warnings.warn(
                "SLNB.load_state_dict: the checkpoint's hyperparameters replace this optimizer's "
                f"(as in torch.optim): {'; '.join(changed)}. To change one after resuming, set "
                "optimizer.param_groups[i][key] after load_state_dict.", UserWarning,
                stacklevel=2)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(params, saved_ids):
            state = state_dict["state"].get(i)
            if not state or p not in self.state:
                continue
            for key, value in state.items():
                if not (isinstance(value, Tensor) and value.is_floating_point()):
                    continue
                if key in ("step", "stat_step"):  # host-side counters
                    self.state[p][key] = value.detach().to("cpu", torch.float32).clone()
                else:
                    self.state[p][key] = value.to(device=p.device, dtype=stat_dtype(p.dtype))

    def _check_saved_options(self, saved: dict[str, Any] | None,
                             states: dict[Any, dict[str, Any]]) -> None:
        """Refuse a checkpoint whose state means something else under this optimizer's options."""
        mine = self._options()
        if saved is None:  # written before the options were saved: check what the state shows
            self._check_unrecorded_options(states)
            return
        if saved.get("format", 0) > STATE_FORMAT:
            raise ValueError(
                f"Cannot load this SLNB checkpoint: its format {saved['format']} is newer than "
                f"this hf_slnb's ({STATE_FORMAT}); upgrade hf_slnb to load it.")
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
        if "momentum_buffer" in keys:  # a step was taken: its trust region left its buffers
            shown["trust_region"] = (("graft", "graft_row") if "exp_avg_sq" in keys else
                                     ("tensor",) if "metric_sq" in keys else ("global",))
        if "mu" in keys:  # statistics exist: PCG left its solutions, the diagonal did not
            shown["diagonal_only"] = ("solution" not in keys,)
        wrong = {k: v for k, v in shown.items() if getattr(self, k) not in v}
        if wrong:
            lines = "; ".join(f"{k}: checkpoint {' or '.join(repr(x) for x in v)}, this "
                              f"optimizer {getattr(self, k)!r}" for k, v in wrong.items())
            raise ValueError(
                "Cannot load this SLNB checkpoint: it does not record its options (it was "
                "written by an older hf_slnb), and its state shows options other than this "
                f"optimizer's ({lines}). Build the optimizer with the options it was trained "
                "with and load it again.")
        unchecked = [k for k in STATE_OPTIONS if k not in shown]
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
        for gi, (group, mine) in enumerate(zip(groups, self.param_groups)):
            for k, (i, p) in enumerate(zip(group["params"], mine["params"])):
                neuron = self._neuron_of.get(id(p))
                for key, value in (state_dict["state"].get(i) or {}).items():
                    if not isinstance(value, Tensor) or key in ("step", "stat_step"):
                        continue
                    if key in ("mu", "nu"):
                        want = None if neuron is None else (neuron.num_features,)
                    else:
                        want = () if key == "metric_sq" else tuple(p.shape)
                    if want is not None and tuple(value.shape) != want:
                        raise ValueError(
                            f"Invalid state_dict: its {key!r} for parameter "
                            f"{self._names.get(id(p), '?')!r} (group {gi}, position {k}) has shape "
                            f"{tuple(value.shape)}, but this optimizer needs {want}: the "
                            "checkpoint was written for another model (or another order of "
                            "parameters).")

    def _changed_hyperparameters(self, groups: list[dict[str, Any]]) -> list[str]:
        """Per-group hyperparameters of this optimizer that the checkpoint's values replace."""
        out = []
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            for key in _GROUP_KEYS:
                # A scheduler's base lr ("initial_lr") is the constructor's: the current lr is
                # the schedule's and is restored with it.
                base, new = ((mine.get("initial_lr", mine["lr"]), saved.get("initial_lr",
                             saved.get("lr"))) if key == "lr" else (mine.get(key), saved.get(key)))
                if key in saved and base != new:
                    out.append(f"group {i} {key}={base!r} -> {new!r}")
        return out

    # -- diagnostics ------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Quantities of the last step worth logging (synchronises only when called).

        ``slnb/step_norm``: the metric norm ``n`` the update is divided by (``>= min_norm``);
        ``slnb/cg_rel_residual``: the largest relative PCG residual over neurons;
        ``slnb/preconditioned_fraction``: share of updated elements that were preconditioned;
        ``slnb/skipped_steps``: steps skipped for non-finite values so far.
        """
        out = {k: float(v) for k, v in self._last.items()}
        out["slnb/skipped_steps"] = float(self.skipped_steps)
        return out

    # -- the step ---------------------------------------------------------------------------
    def _warn_uncaptured(self) -> None:
        """Warn once per layer whose weight has a gradient but whose input was never seen.

        Python-side facts only (no device sync): such a layer was used functionally
        (``F.linear(x, layer.weight)``) or run in eval mode / under ``no_grad``, and gets the
        identity metric. Not said after ``remove_hooks()``, which asks for exactly that.
        """
        if not self._hooks:
            return
        for n in self.neurons:
            if n.capture is None and n.weight.grad is not None and (
                    n.name not in self._uncaptured_warned):
                self._uncaptured_warned.add(n.name)
                warnings.warn(
                    f"SLNB: layer {n.name!r} got a gradient but SLNB never saw its input (the "
                    "layer was used functionally, e.g. through F.linear(x, layer.weight), or ran "
                    "in eval mode or under torch.no_grad()); it gets the identity metric. Call "
                    "the module itself, or add it to skip_modules to silence this.",
                    UserWarning, stacklevel=5)  # past step's no_grad and profiling wrappers

    def _reduce_captures(self, world: int) -> None:
        """Sum every neuron's capture over the data-parallel ranks (one collective per dtype)."""
        if world == 1:
            return
        tensors: list[Tensor] = []
        for n in self.neurons:
            if n.capture is None:
                n.capture = n._new_capture(n.choose_explicit(0, self.diagonal_only, True))
            tensors.extend(n.capture.tensors())
        distributed.all_reduce_sum(tensors, self.process_group)

    def _nonfinite(self, params: list[Tensor]) -> list[str]:
        """Names of parameters with a non-finite gradient and modules with a non-finite input."""
        grads = [local(p.grad) for p in params]  # type: ignore[arg-type]
        checks: list[Tensor] = [t.to(torch.float64) for t in torch._foreach_norm(grads)] if grads else []
        if checks and self._shard_group is not None:  # every rank must skip, or none
            norms = torch.stack(checks)
            distributed.all_reduce_sum([norms], self._shard_group)
            checks = list(norms.unbind())
        caps = [n for n in self.neurons if n.capture is not None]
        checks += [(n.capture.sum_x.sum() + n.capture.square_sums().sum()).to(torch.float64)
                   for n in caps]  # type: ignore[union-attr]
        if not checks:
            return []
        flags = torch.isfinite(torch.stack(checks))
        if bool(flags.all()):
            return []
        bad = [self._names.get(id(p), "?") for p, ok in zip(params, flags) if not ok]
        bad += [f"inputs of {n.name}" for n, ok in zip(caps, flags[len(params):]) if not ok]
        return bad

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one SLNB step with the gradients and inputs accumulated since the last one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_replaced_params()
        if self._hooks_taken:
            raise RuntimeError(
                f"SLNB: a newer SLNB optimizer built on the same model took over this one's hooks "
                f"(on {', '.join(repr(t) for t in self._hooks_taken[:5])}); this optimizer no "
                "longer sees the layers' inputs. Step the newer optimizer, or build one optimizer "
                "per model.")
        world = distributed.world_size(self.process_group)
        group_of: dict[int, dict[str, Any]] = {}
        params: list[Tensor] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("SLNB does not support sparse gradients "
                                           f"(parameter {self._names.get(id(p), '?')!r}).")
                    group_of[id(p)] = group
                    params.append(p)
        self._follow_dtypes(params)
        self._warn_uncaptured()
        self._reduce_captures(world)
        reduce_fn = None
        if world > 1:
            def reduce_fn(ts: list[Tensor]) -> None:
                distributed.all_reduce_sum(ts, self.process_group)
        for n in self.neurons:
            n.reduce_fn = reduce_fn
        bad = self._nonfinite(params)
        if bad:
            warnings.warn(f"SLNB skipped a step: non-finite values in {', '.join(bad)}; "
                          "parameters and optimizer state are unchanged.", RuntimeWarning,
                          stacklevel=2)
            self.skipped_steps += 1
            self.clear_captures()
            return loss
        if not params:
            self.clear_captures()
            return loss

        g_hat = self._momentum(params, group_of)
        h: dict[int, Tensor] = {}
        rels: list[Tensor] = []
        for neuron in self.neurons:
            rel = self._precondition(neuron, g_hat, group_of, h)
            if rel is not None:
                rels.append(rel)
        hs = [h.get(id(p), g_hat[id(p)]) for p in params]  # identity metric for the rest
        gs = [g_hat[id(p)] for p in params]
        inners = [dot((a,), (b,)) for a, b in zip(hs, gs)]
        if self._shard_group is not None:  # local shards: sum the partial inner products
            sharded = [i for i, p in enumerate(params) if is_dtensor(p)]
            partial = torch.stack([inners[i].to(torch.float64) for i in sharded])
            distributed.all_reduce_sum([partial], self._shard_group)
            for i, q in zip(sharded, partial.unbind()):
                inners[i] = q.to(inners[i].dtype)
        inner = torch.stack([q.to(torch.float64) for q in inners]).sum()
        n = torch.sqrt(torch.clamp(inner, min=self.min_norm**2))
        if self.trust_region == "global":
            scales = [(-group_of[id(p)]["lr"] / n) for p in params]
        elif self.trust_region == "tensor":
            scales = self._tensor_scales(params, inners, group_of)
        else:
            hs, scales = self._graft(params, hs, gs, h, group_of)
        self._apply(params, hs, group_of, scales)

        numel = sum(p.numel() for p in params)
        self._last = {
            "slnb/step_norm": n,
            "slnb/cg_rel_residual": torch.stack(rels).max() if rels else 0.0,
            "slnb/preconditioned_fraction": sum(
                p.numel() for p in params if id(p) in h) / max(numel, 1),
        }
        self.clear_captures()
        return loss

    def _follow_dtypes(self, params: list[Tensor]) -> None:
        """Cast a parameter's state when the model changed dtype or device (``model.double()``).

        The state is kept in :func:`~hf_slnb.layers.stat_dtype` of its parameter, on its device;
        the momentum buffer, created with the rest, tells whether the parameter has changed.
        """
        for p in params:
            state = self.state.get(p)
            m = state.get("momentum_buffer") if state else None
            if m is None or (m.dtype == stat_dtype(p.dtype) and m.device == p.device):
                continue
            for key, value in state.items():  # type: ignore[union-attr]
                if (isinstance(value, Tensor) and value.is_floating_point()
                        and key not in ("step", "stat_step")):
                    state[key] = value.to(device=p.device, dtype=stat_dtype(p.dtype))  # type: ignore[index]

    def _momentum(self, params: list[Tensor], group_of: dict[int, dict[str, Any]]) -> dict[int, Tensor]:
        """Update each momentum buffer and return the bias-corrected momentum ``g``."""
        out: dict[int, Tensor] = {}
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["momentum_buffer"] = torch.zeros_like(p, dtype=stat_dtype(p.dtype),
                                                            memory_format=torch.preserve_format)
                if is_dtensor(p):  # a sharded checkpoint's template needs every key now
                    self._init_sharded_state(p, state)
            state["step"] += 1
            beta = group_of[id(p)]["momentum"]
            m = local(state["momentum_buffer"])
            grad = local(p.grad).to(m.dtype)  # type: ignore[arg-type]
            if beta == 0.0:
                m.copy_(grad)
            else:
                m.lerp_(grad, 1.0 - beta)
            out[id(p)] = m / (1.0 - beta ** int(state["step"].item()))
        return out

    def _precondition(
        self,
        neuron: Neuron,
        g_hat: dict[int, Tensor],
        group_of: dict[int, dict[str, Any]],
        h: dict[int, Tensor],
    ) -> Tensor | None:
        """Solve one neuron's metric system; leaves ``h`` untouched for an identity fallback."""
        w, b = neuron.weight, neuron.bias
        cap = neuron.capture
        if id(w) not in g_hat or cap is None or not bool(cap.count > 0):
            return None
        with_bias = b is not None and id(b) in g_hat
        group = group_of[id(w)]
        state = self.state[w]
        mu, nu, denom = self._update_statistics(neuron, state, group, with_bias)
        owners = (w, b) if with_bias else (w,)
        g: Vec = tuple(g_hat[id(p)] for p in owners)  # type: ignore[union-attr]
        sharded = is_dtensor(w)
        mode = self._shard_mode(neuron, owners) if sharded else "whole"
        gather = mode == "gather"
        if gather:  # the solve needs the whole layer: every rank solves it, keeps its shard
            g = tuple(distributed.gather_rows(t, p) for t, p in zip(g, owners))  # type: ignore[arg-type]

        inv_denom = torch.reciprocal(denom)
        if mode == "features":  # this rank holds the rows of features lo..hi of every unit
            lo, hi = distributed.shard_range(w)  # type: ignore[misc]
            mu, inv_denom = mu[lo:hi], inv_denom[lo:hi]
            if with_bias:
                g = (g[0], distributed.gather_rows(g[1], b))  # type: ignore[arg-type]

        def precond(v: Vec) -> Vec:
            return neuron.precondition(v, mu, inv_denom)

        if self.diagonal_only:
            sol, rel = precond(g), None
            if mode == "features" and with_bias:
                # b' = b - sum over features of w' mu: this rank's features give one part.
                part = g[1] - sol[1]
                distributed.all_reduce_sum([part], self._shard_group)
                sol = (sol[0], distributed.local_rows(g[1] - part, b))  # type: ignore[arg-type]
        else:
            ridge = group["ridge"]
            if self.ridge_mode == "relative":  # scale-free: relative to the mean feature energy
                ridge = ridge * float(nu.mean())
            neuron.prepare(ridge)
            if "solution" in state:
                x0: Vec | None = tuple(
                    self._warm_start(p, gi, gather) for p, gi in zip(owners, g)  # type: ignore[arg-type]
                )
            else:
                x0 = None
            inner = self._sharded_dot if sharded and not gather else dot
            sol, rel = conjugate_gradient(neuron.metric, g, x0, precond, group["cg_iters"],
                                          self.cg_tol, inner)
        if gather:
            sol = tuple(distributed.local_rows(t, p) for t, p in zip(sol, owners))  # type: ignore[arg-type]
        if not self.diagonal_only:
            for p, s in zip(owners, sol):
                if sharded:
                    local(self.state[p]["solution"]).copy_(s)  # type: ignore[index]
                else:
                    self.state[p]["solution"] = s  # type: ignore[index]
        h[id(w)] = sol[0]
        if with_bias:
            h[id(b)] = sol[1]
        return rel

    @staticmethod
    def _init_statistics(neuron: Neuron, state: dict[str, Any]) -> None:
        """Zero feature EMAs and their step count (what the first step with inputs starts from)."""
        d = neuron.num_features
        state["mu"] = torch.zeros(d, dtype=neuron.dtype, device=neuron.weight.device)
        state["nu"] = torch.zeros(d, dtype=neuron.dtype, device=neuron.weight.device)
        state["stat_step"] = torch.zeros((), dtype=torch.float32)

    def _update_statistics(self, neuron: Neuron, state: dict[str, Any], group: dict[str, Any],
                           with_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Fold this step's capture into the feature EMAs; return ``(mu, nu, denom)``.

        ``mu`` and ``nu`` are bias-corrected; ``denom`` is the preconditioner's denominator.
        """
        cap = neuron._captured()
        if "mu" not in state:
            self._init_statistics(neuron, state)
        state["stat_step"] += 1
        t = int(state["stat_step"].item())
        state["mu"].lerp_(cap.sum_x / cap.count, 1.0 - group["mean_decay"])
        state["nu"].lerp_(cap.square_sums() / cap.count, 1.0 - group["sq_mean_decay"])
        nu = bias_corrected(state["nu"], group["sq_mean_decay"], t)
        mu, denom = preconditioner_terms(
            bias_corrected(state["mu"], group["mean_decay"], t), nu, group["shrinkage"], with_bias)
        return mu, nu, denom

    # -- fully sharded parameters (FSDP2) --------------------------------------------------------
    def _shard_mode(self, neuron: Neuron, owners: tuple[Tensor, ...]) -> str:
        """How a sharded neuron is solved: ``"rows"``, ``"features"`` or ``"gather"``.

        ``rows``: the shards are whole output units, which share the metric, so each rank
        solves its own (``nn.Linear`` with the explicit second moment or the diagonal, an
        ungrouped convolution with the diagonal). ``features``: the shards are input features,
        and the diagonal preconditioner acts feature by feature (HF ``Conv1D``, stored
        ``(in, out)``, and embeddings, with the diagonal): a bias is gathered and its
        correction summed over the shards. ``gather``: everything else (PCG across features,
        matrix-free products) gathers the layer's gradient, and every rank solves the layer.
        """
        cap = neuron.capture
        if isinstance(neuron, LinearNeuron) and neuron.features_last:
            rows = self.diagonal_only or (cap is not None and cap.gram is not None)
        else:
            rows = (neuron.kind == "conv" and self.diagonal_only
                    and getattr(neuron.module, "groups", 1) == 1)
        if rows and len({local(p).shape[0] for p in owners}) == 1:
            return "rows"
        by_feature = neuron.kind == "embedding" or (
            isinstance(neuron, LinearNeuron) and not neuron.features_last)
        if by_feature and self.diagonal_only and distributed.shard_range(owners[0]) is not None:
            return "features"
        return "gather"

    def _sharded_dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        """Inner product of two row-sharded vectors: the local part summed over the shards."""
        q = dot(a, b)
        distributed.all_reduce_sum([q], self._shard_group)
        return q

    def _warm_start(self, p: Tensor, like: Tensor, gather: bool) -> Tensor:
        """The last PCG solution of ``p`` (zeros if none), laid out as ``like``."""
        saved = self.state[p].get("solution")
        if saved is None:
            return torch.zeros_like(like)
        if is_dtensor(saved):
            return saved.full_tensor() if gather else local(saved)  # type: ignore[attr-defined]
        return saved

    def _init_sharded_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """Create every state entry of a sharded parameter at once.

        FSDP2 checkpoints (``torch.distributed.checkpoint``, Accelerate's sharded state dict)
        load into a template made by a first step without inputs, which would otherwise lack the
        entries created lazily (statistics, PCG solutions). The values equal the lazy ones.
        """
        dtype = stat_dtype(p.dtype)
        if self.trust_region in ("graft", "graft_row"):
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        elif self.trust_region == "tensor":
            state["metric_sq"] = torch.zeros((), dtype=dtype, device=p.device)
        neuron = self._neuron_of.get(id(p))
        if neuron is not None:
            self._init_statistics(neuron, state)
        if not self.diagonal_only and (neuron is not None or id(p) in self._bias_owner):
            state["solution"] = torch.zeros_like(p, dtype=dtype)

    def _tensor_scales(self, params: list[Tensor], inners: list[Tensor],
                       group_of: dict[int, dict[str, Any]]) -> list[Tensor]:
        """Per-tensor trust regions: ``-lr / (sqrt(EMA(<h, g> / numel)) + eps)``, Adam-mini style."""
        scales = []
        decay = self.norm_decay
        for p, q in zip(params, inners):
            state = self.state[p]
            if "metric_sq" not in state:
                state["metric_sq"] = torch.zeros((), dtype=q.dtype, device=q.device)
            state["metric_sq"].lerp_(torch.clamp(q / p.numel(), min=0.0), 1.0 - decay)
            t = int(state["step"].item())
            rms = torch.sqrt(state["metric_sq"] / (1.0 - decay**t))
            scales.append(-group_of[id(p)]["lr"] / (rms + self.eps))
        return scales

    def _graft(self, params: list[Tensor], hs: list[Tensor], gs: list[Tensor],
               preconditioned: dict[int, Tensor], group_of: dict[int, dict[str, Any]]
               ) -> tuple[list[Tensor], list[Tensor]]:
        """Adam grafting: each tensor's step has the norm of Adam's, SLNB's direction.

        Parameters with the identity metric take Adam's step itself. ``norm_decay`` is Adam's
        ``beta2``, the momentum its ``beta1``.
        """
        decay = self.norm_decay
        out_h: list[Tensor] = []
        scales: list[Tensor] = []
        pending = []  # sharded reductions: (index, lr, per row, partial |adam|^2, |h|^2)
        for i, (p, hh, g) in enumerate(zip(params, hs, gs)):
            state = self.state[p]
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(g)
            grad = local(p.grad)  # type: ignore[arg-type]
            v = local(state["exp_avg_sq"])
            v.mul_(decay).addcmul_(grad, grad, value=1.0 - decay)
            t = int(state["step"].item())
            adam = g / (torch.sqrt(v / (1.0 - decay**t)) + self.eps)
            lr = group_of[id(p)]["lr"]
            tiny = torch.finfo(hh.dtype).tiny
            neuron = self._neuron_of.get(id(p))
            if id(p) not in preconditioned:
                out_h.append(adam)
                scales.append(torch.tensor(-lr, dtype=adam.dtype, device=adam.device))
                continue
            per_row = neuron is not None and self.trust_region == "graft_row"
            dims = neuron.row_dims if per_row else None  # type: ignore[union-attr]
            if is_dtensor(p) and (dims is None or 0 in dims):  # norms span several shards
                pending.append((i, lr, per_row, (adam * adam).sum(dims, keepdim=per_row),
                                (hh * hh).sum(dims, keepdim=per_row)))
                out_h.append(hh)
                scales.append(torch.tensor(-lr, dtype=adam.dtype, device=adam.device))
            elif per_row:
                ratio = torch.linalg.vector_norm(adam, dim=dims, keepdim=True) / torch.clamp(
                    torch.linalg.vector_norm(hh, dim=dims, keepdim=True), min=tiny)
                out_h.append(hh * ratio)
                scales.append(torch.tensor(-lr, dtype=adam.dtype, device=adam.device))
            else:
                ratio = torch.linalg.vector_norm(adam) / torch.clamp(
                    torch.linalg.vector_norm(hh), min=tiny)
                out_h.append(hh)
                scales.append(-lr * ratio)
        if pending:
            distributed.all_reduce_sum([t for item in pending for t in item[3:]],
                                       self._shard_group)
            for i, lr, per_row, na2, nh2 in pending:
                tiny = torch.finfo(nh2.dtype).tiny
                ratio = torch.sqrt(na2) / torch.clamp(torch.sqrt(nh2), min=tiny)
                if per_row:
                    out_h[i] = out_h[i] * ratio
                else:
                    scales[i] = -lr * ratio
        return out_h, scales

    def _apply(self, params: list[Tensor], hs: list[Tensor], group_of: dict[int, dict[str, Any]],
               scales: list[Tensor]) -> None:
        """``p <- p - lr (h / n + wd p)``: ``scales[i] = -lr / n`` for parameter ``i``."""
        for group in self.param_groups:
            members = [(p, hh, sc) for p, hh, sc in zip(params, hs, scales)
                       if group_of[id(p)] is group]
            if not members:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            if wd != 0.0:
                torch._foreach_mul_([local(m[0]) for m in members], 1.0 - lr * wd)
            for p, hh, sc in members:
                local(p).addcmul_(hh, sc)
