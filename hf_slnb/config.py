"""SLNB's options: one table that validates them, fills presets, and generates docs and HF flags.

Every option is an :class:`Option` (name, type, allowed values, help text, whether a parameter
group may override it, whether it gives the optimizer state its meaning, and when it has an
effect). :class:`SLNBConfig` is the dataclass of all of them; a preset is an instance of it
(:data:`PRESETS`). The constructor's docstring table, the Trainer's ``--slnb_*`` fields, the
``--optim_args`` keys and types and ``--help`` are generated from :data:`OPTIONS`, so they cannot
drift apart. Nothing here imports anything but the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: Allowed values of the string options.
BACKENDS = ("auto", "explicit", "matrix_free")
RIDGE_MODES = ("absolute", "relative")
#: Step rules by their ``trust_region`` name (the classes are in :mod:`hf_slnb.step_rules`).
TRUST_REGIONS = ("global", "tensor", "graft", "graft_row", "orth")
#: Update directions by name (the classes are in :mod:`hf_slnb.directions`).
DIRECTION_NAMES = ("diagonal", "pcg", "whitened_orth", "diag_whitened_orth")
#: Directions that orthogonalise (the step rule ``orth`` scales them).
ORTH_DIRECTIONS = ("whitened_orth", "diag_whitened_orth")
PRESET_NAMES = ("graft", "paper", "whitened")
#: The preset used when none is given, for a model with a trained ``nn.Linear`` or HF ``Conv1D``
#: inside a repeated block (a transformer): what it orthogonalises (issue 13, round 14).
DEFAULT_PRESET = "whitened"
#: The preset used when none is given for any other model (convolutions, embeddings, a plain
#: MLP), where ``whitened`` would orthogonalise nothing, or nothing but a classifier, and so be
#: AdamW at 10x the lr (see :func:`hf_slnb.binding.default_preset_for`).
FALLBACK_PRESET = "graft"
#: Which layers an orthogonalising direction takes (``orth_layers``).
ORTH_LAYERS = ("blocks", "hidden")
#: What the layers an orthogonalising direction does not take get (``orth_rest``).
ORTH_REST = ("adam", "diagonal")
#: The dtype of the Newton-Schulz orthogonalisation (``orth_dtype``).
ORTH_DTYPES = ("auto", "bfloat16", "float32")


def _real(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}={value!r}{where}: must be a real number.")  # noqa: TRY004
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}={value!r}{where}: must be finite.")
    return float(value)


def _unit(name: str, value: Any, where: str) -> None:
    v = _real(name, value, where)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid {name}={v!r}{where}: must be in [0.0, 1.0).")


def _nonneg(name: str, value: Any, where: str) -> None:
    if _real(name, value, where) < 0.0:
        raise ValueError(f"Invalid {name}={value!r}{where}: must be >= 0.")


def _finite(low: str) -> Callable[[str, Any, str], None]:
    def check(name: str, value: Any, where: str) -> None:
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and math.isfinite(value) and (value > 0 if low == ">" else value >= 0))
        if not ok:
            raise ValueError(f"Invalid {name}={value!r}{where}: must be a finite number {low} 0.")
    return check


def _count(name: str, value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}={value!r}{where}: must be an integer >= 0.")


def _positive(name: str, value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}={value!r}{where}: must be an integer >= 1.")


def _flag(name: str, value: Any, where: str) -> None:
    if not isinstance(value, bool):  # bool("false") is True
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError here, whatever its type
            f"Invalid {name}={value!r}{where}: must be True or False (or None for the preset's "
            "value).")


def _choice(allowed: tuple[str, ...]) -> Callable[[str, Any, str], None]:
    def check(name: str, value: Any, where: str) -> None:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"Invalid {name}={value!r}{where}: must be one of {allowed}.")
    return check


def compile_patterns(skip_modules: Any) -> list[re.Pattern[str]]:
    """``skip_modules`` as compiled patterns, or ``ValueError`` naming the bad entry."""
    if isinstance(skip_modules, (str, re.Pattern)):
        skip_modules = (skip_modules,)
    if not isinstance(skip_modules, Iterable):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError here, whatever its type
            f"Invalid skip_modules={skip_modules!r}: must be a sequence of regular expressions "
            "(strings), e.g. ('lm_head',); () for none.")
    out = []
    for pattern in skip_modules:
        if not isinstance(pattern, (str, re.Pattern)) or not isinstance(
                getattr(pattern, "pattern", pattern), str):
            raise ValueError(  # noqa: TRY004 - as above
                f"Invalid skip_modules entry {pattern!r}: must be a regular expression (a string).")
        try:
            out.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(
                f"Invalid skip_modules entry {pattern!r}: must be a regular expression ({err})."
            ) from None
    return out


def _patterns(name: str, value: Any, where: str) -> None:
    compile_patterns(value)


def _pcg(c: SLNBConfig) -> bool:
    return c.direction == "pcg"


def _orth(c: SLNBConfig) -> bool:
    return c.direction in ORTH_DIRECTIONS


#: The start of an orthogonalising-direction option's ``why_not``.
_ORTH_ONLY = "only an orthogonalising direction ('whitened_orth', 'diag_whitened_orth') "


def _whitening(c: SLNBConfig) -> bool:
    return c.direction == "whitened_orth"


def _graft_or_tensor(c: SLNBConfig) -> bool:
    return c.trust_region != "global"


@dataclass(frozen=True)
class Option:
    """One SLNB option.

    Attributes:
        name: The keyword (``--slnb_<name>`` in the Trainer, ``<name>`` in ``--optim_args``).
        kind: Its Python type: ``float``, ``int``, ``bool``, ``str`` or ``list`` (of regexes).
        help: Meaning, range and what it changes (the docs and ``--help`` print it).
        check: ``check(name, value, where)`` raises ``ValueError`` naming the value.
        choices: The allowed strings, for ``str`` options.
        per_group: A parameter group may override it (as ``lr`` in ``torch.optim``).
        state: It gives the optimizer state its meaning: a checkpoint loads only into an
            optimizer with the same value.
        acts: ``acts(config)``: whether it changes anything under a resolved configuration
            (an option given explicitly that does not act is warned about).
        why_not: What makes it inactive, for that warning.
    """

    name: str
    kind: type
    help: str
    check: Callable[[str, Any, str], None]
    choices: tuple[str, ...] | None = None
    per_group: bool = False
    state: bool = False
    acts: Callable[[SLNBConfig], bool] | None = None
    why_not: str = ""


OPTIONS: tuple[Option, ...] = (
    Option("preset", str, "'whitened' (issue 13: Muon's orthogonalisation in whitened "
           "coordinates for the layers of the repeated blocks, Adam's step elsewhere, lr "
           "AdamW's; see BENCHMARKS.md), 'graft' (SLNB's diagonal direction with Adam's step "
           "size per output row, for every layer kind) or 'paper' (the published algorithm, "
           "ALGORITHM.md, exactly). Not given: 'whitened' for a model with a trained nn.Linear "
           "or Conv1D inside a repeated block (a transformer layer), 'graft' for any other "
           "(convolutions, embeddings, a plain MLP). Sets every option below that is not given.",
           _choice(PRESET_NAMES), PRESET_NAMES, state=True),
    Option("lr", float, "with trust_region='global' the trust-region radius (the metric length "
           "of each update, 0.05-1 is reasonable); otherwise an Adam-like step (taken at lr_scale * "
           "lr). >= 0.", _nonneg,
           per_group=True),
    Option("lr_scale", float, "the step is taken at lr_scale * lr (the decoupled weight decay "
           "too): a preset's map from the lr you would give AdamW onto its own. 'whitened' "
           "takes 10, because its best lr was 10x AdamW's best on all four benchmarks "
           "(BENCHMARKS.md, issue 13): so AdamW's lr, and its schedule, carry over as they are "
           "(schedulers and the Trainer's logged learning_rate see lr itself). 1 elsewhere. "
           "> 0; a checkpoint made with another value is refused (it would resume at another "
           "step size).",
           _finite(">"), state=True),
    Option("rest_lr_scale", float, "under an orthogonalising direction, the parameters it does "
           "not orthogonalise (embeddings, heads, norms, biases: orth_rest's) step at "
           "rest_lr_scale * lr_scale * lr (weight decay too), the orthogonalised layers at "
           "lr_scale * lr. 1 by default: one step size for both. 0.1 under 'whitened' gives "
           "them AdamW's own lr while the orthogonalised layers keep 10x it: what encoder "
           "classifiers trained from scratch needed (BENCHMARKS.md, issue 13, round 17). > 0; a "
           "checkpoint made with another value is refused.",
           _finite(">"), state=True, acts=_orth,
           why_not=_ORTH_ONLY + "steps the two kinds of parameter apart"),
    Option("momentum", float, "decay beta_g of the gradient's moving average, in [0, 1).", _unit,
           per_group=True),
    Option("mean_decay", float, "decay of the moving average of each layer's input-feature "
           "means, in [0, 1).", _unit, per_group=True),
    Option("sq_mean_decay", float, "decay of the moving average of the input features' mean "
           "squares, in [0, 1).", _unit, per_group=True),
    Option("shrinkage", float, "share s of the mean variance mixed into each feature's variance "
           "in the diagonal preconditioner, in [0, 1).", _unit, per_group=True),
    Option("weight_decay", float, "decoupled weight decay lambda, >= 0.", _nonneg, per_group=True),
    Option("direction", str, "the update direction of the layers: 'diagonal' (h = P g, SLNB's "
           "diagonal preconditioner), 'pcg' (the metric solved by conjugate gradient, the paper's) "
           "or 'whitened_orth' (orth(G C^-1/2) C^-1/2 with C each layer's input covariance: Muon "
           "in whitened coordinates; the Linear/Conv1D layers orth_layers picks, others keep g) or "
           "'diag_whitened_orth' (the same with C's diagonal, SLNB's diagonal preconditioner: "
           "Muon's cost).",
           _choice(DIRECTION_NAMES), DIRECTION_NAMES, state=True),
    Option("orth_layers", str, "the Linear/Conv1D layers an orthogonalising direction takes: "
           "'blocks' (those inside a repeated block, a member of an nn.ModuleList or "
           "nn.Sequential that is a module of its own, such as a transformer layer; a model with "
           "no such layer uses 'hidden'), as Muon's authors do, or 'hidden' (every one but the "
           "language-model head, so also a classifier and a pooler). The others take Adam's step.",
           _choice(ORTH_LAYERS), ORTH_LAYERS, state=True, acts=_orth,
           why_not=_ORTH_ONLY + "picks layers"),
    Option("orth_rest", str, "what the other layers (embeddings, heads, convolutions, layers "
           "beside the blocks) get under an orthogonalising direction: 'adam' (Adam's step, as "
           "Muon's authors give them) or 'diagonal' (SLNB's diagonal preconditioner at the length "
           "Adam would step each output row, as preset 'graft' gives every layer).",
           _choice(ORTH_REST), ORTH_REST, state=True, acts=_orth,
           why_not=_ORTH_ONLY + "leaves layers to another step"),
    Option("orth_dtype", str, "the dtype the Newton-Schulz orthogonalisation runs in: 'auto' "
           "(bfloat16 on accelerators, as Muon; on the CPU bfloat16 for the layers whose short "
           "side is at least 128 where it has native bfloat16 instructions, AVX512-BF16 or "
           "AMX, which run those products about twice as fast as float32 (elongated layers: "
           "AMX only), and float32 elsewhere: without them bfloat16 matmuls are 10-60x "
           "slower), 'bfloat16' or 'float32'. float64 parameters always run in float64.",
           _choice(ORTH_DTYPES),
           ORTH_DTYPES, acts=_orth,
           why_not=_ORTH_ONLY + "orthogonalises"),
    Option("orth_split", bool, "share the orthogonalisation out over the ranks, as "
           "distributed Muon does: in data parallel each rank orthogonalises its share of every "
           "bank of same-shape layers, and refreshes its share of their inverse roots, and the "
           "results are all-gathered (one all-gather of those layers' float32 updates per step, "
           "and of their roots per refresh); under FSDP2 each sharded layer has an owner, round "
           "robin, that gathers it, orthogonalises it and scatters the shards back (a gather and "
           "a scatter instead of an all-gather; the owner broadcasts the refreshed root). The "
           "same numbers, bit for bit, for 1/world of that work. False computes every layer on "
           "every rank (an FSDP2 layer after an all-gather): better on a slow network. No effect "
           "in one process.", _flag, acts=_orth,
           why_not=_ORTH_ONLY + "orthogonalises"),
    Option("whiten_every", int, "steps between refreshes of each layer's whitening of its "
           "inputs for direction='whitened_orth' (C^-1/2 by Newton-Schulz on accelerators; on "
           "the CPU L^-T from the Cholesky factor C = L L^T, which gives the same update at a "
           "sixth of an eigendecomposition's cost; with cov_every > 1 at the covariance's updates: "
           "the largest multiple of cov_every up to it, at least cov_every), integer >= 1.",
           _positive, acts=_whitening,
           why_not="only direction='whitened_orth' keeps an inverse root"),
    Option("cov_every", int, "steps between updates of each layer's input covariance for "
           "direction='whitened_orth': the layers' inputs are captured (x x^T and the feature "
           "sums) in one step of every cov_every, the first included, and the covariance EMA "
           "takes one update then (decay 0.95 per update); the steps in between orthogonalise "
           "with the inverse roots as they stand, and their forward and backward passes do none "
           "of SLNB's capture work (except under torch.compile, whose graph captures every "
           "step; the step ignores it). The inverse roots are refreshed at every floor("
           "whiten_every / cov_every)-th update (at least every update): no root is older than "
           "whiten_every steps. The covariance changes slowly: 'whitened' takes 4 (its roots "
           "then at most 8 steps old), at the losses of 3 and 1 on all four benchmarks "
           "(BENCHMARKS.md, issue 13, rounds 15 and 20), for a quarter of the capture work (5 "
           "lost 0.008 on GPT-2). Integer >= 1 (1: every step).", _positive, acts=_whitening,
           why_not="only direction='whitened_orth' keeps an input covariance"),
    Option("cov_rows", int, "at most this many input positions (tokens) per forward, evenly "
           "strided (a stride coprime to the sequence length, so every position of a sequence "
           "is sampled alike), enter the x x^T and the feature sums of a layer with "
           "direction='whitened_orth' (rescaled to every position; the other positions are not "
           "read); 0 takes all. The covariance is an average over steps, so a few hundred "
           "positions per step estimate it and cut its cost, d^2 per position. "
           "Integer >= 0.", _count, acts=_whitening,
           why_not="only direction='whitened_orth' keeps x x^T for the whitening"),
    Option("max_block", int, "inputs wider than this are whitened in diagonal blocks of at "
           "most this many features (direction='whitened_orth'), as Shampoo bounds its "
           "preconditioners: the blocks' covariances and inverse roots replace the whole "
           "input's, so the memory a layer keeps is 8-16 bytes x d x max_block, not x d^2, each "
           "inverse root costs max_block^3, not d^3, and each whitening product d max_block, "
           "not d^2, per output (the orthogonalisation still sees the whole layer). 256 lost "
           "nothing measurable against whole inputs (BENCHMARKS.md, issue 13, rounds 9-10). 0 "
           "whitens every input whole. Integer >= 0; it fixes the shape of the saved "
           "covariances (a checkpoint made with another value is refused, naming it).", _count,
           acts=_whitening,
           why_not="only direction='whitened_orth' keeps an input covariance"),
    Option("diagonal_only", bool, "shorthand kept from before 'direction': True is "
           "direction='diagonal', False direction='pcg'.", _flag, state=True),
    Option("precondition_embeddings", bool, "give nn.Embedding its exact metric (token "
           "frequencies); otherwise embeddings use the identity metric.", _flag, state=True),
    Option("skip_modules", list, "regular expressions (re.search on the qualified module name, "
           "e.g. 'lm_head'); matching layers use the identity metric.", _patterns, state=True),
    Option("trust_region", str, "the step rule: 'global' (the paper: one unit step under the "
           "metric for the whole model; lr is its radius), 'tensor' (each tensor divided by its "
           "metric RMS, as in Adam-mini), 'graft' (each tensor's step has Adam's norm and SLNB's "
           "direction), 'graft_row' (Adam's norm per output row of each layer) or 'orth' (for an "
           "orthogonalising direction: its layers' update has RMS 0.2 lr, Moonlight's match to "
           "AdamW, and the rest takes Adam's step); with every rule but 'global' lr is AdamW-like.",
           _choice(TRUST_REGIONS), TRUST_REGIONS, state=True),
    Option("norm_decay", float, "decay of the per-tensor metric RMS ('tensor') or of Adam's "
           "squared gradients ('graft', 'graft_row'), in [0, 1).", _unit, state=True,
           acts=_graft_or_tensor, why_not="trust_region='global' keeps no such average"),
    Option("eps", float, "added to the per-tensor RMS ('tensor') or to Adam's denominator "
           "('graft', 'graft_row'), > 0.", _finite(">"), acts=_graft_or_tensor,
           why_not="trust_region='global' has no such denominator"),
    Option("min_norm", float, "floor of the step's metric norm n with trust_region='global' "
           "(the update is lr * h / max(n, min_norm)), > 0.", _finite(">"),
           acts=lambda c: c.trust_region == "global",
           why_not="only trust_region='global' divides by the metric norm"),
    Option("ridge", float, "ridge gamma added to the metric on weights (never biases) in the "
           "conjugate-gradient solve; larger is closer to momentum SGD. >= 0.", _nonneg,
           per_group=True, acts=_pcg, why_not="diagonal_only=True solves nothing"),
    Option("ridge_mode", str, "'absolute' (the paper: gamma = ridge) or 'relative' (gamma = "
           "ridge * the layer's mean feature second moment, invariant to a rescaling of its "
           "inputs).", _choice(RIDGE_MODES), RIDGE_MODES, state=True, acts=_pcg,
           why_not="diagonal_only=True solves nothing"),
    Option("cg_iters", int, "conjugate-gradient iterations per layer and step, integer >= 0 "
           "(0 keeps the previous step's solution).", _count, per_group=True, acts=_pcg,
           why_not="diagonal_only=True runs no conjugate gradient"),
    Option("cg_tol", float, "conjugate gradient stops early once |residual| <= cg_tol * "
           "|gradient|, >= 0.", _finite(">="), acts=_pcg,
           why_not="diagonal_only=True runs no conjugate gradient"),
    Option("metric_backend", str, "how the metric is applied in the solve: 'explicit' "
           "(accumulate x x^T), 'matrix_free' (keep the inputs) or 'auto' (the cheaper per "
           "layer); all exact.", _choice(BACKENDS), BACKENDS, acts=_pcg,
           why_not="diagonal_only=True never applies the metric"),
)
OPTION = {o.name: o for o in OPTIONS}
#: Options a parameter group may override (the rest are the optimizer's).
GROUP_KEYS = tuple(o.name for o in OPTIONS if o.per_group)
#: Options that give the state its meaning: a checkpoint loads only with equal values.
STATE_OPTIONS = ("preset", "trust_region", "ridge_mode", "diagonal_only",
                 "precondition_embeddings", "skip_modules", "norm_decay", "direction",
                 "orth_layers", "orth_rest", "lr_scale", "rest_lr_scale")
assert set(STATE_OPTIONS) == {o.name for o in OPTIONS if o.state}
#: Options recorded in a checkpoint that may change on resume (the loader's own are used).
FREE_OPTIONS = tuple(o.name for o in OPTIONS if not o.state and not o.per_group)


@dataclass(frozen=True)
class SLNBConfig:
    """Every SLNB option (see :data:`OPTIONS` for meaning and range); presets are instances."""

    preset: str = "graft"
    lr: float = 3e-3
    lr_scale: float = 1.0
    rest_lr_scale: float = 1.0
    momentum: float = 0.9
    mean_decay: float = 0.9
    sq_mean_decay: float = 0.999
    shrinkage: float = 0.1
    weight_decay: float = 1e-4
    direction: str = "diagonal"
    orth_layers: str = "blocks"
    orth_rest: str = "adam"
    orth_dtype: str = "auto"
    orth_split: bool = True
    whiten_every: int = 10
    cov_every: int = 1
    cov_rows: int = 0
    max_block: int = 256
    diagonal_only: bool = True
    precondition_embeddings: bool = True
    skip_modules: tuple[str, ...] = ()
    trust_region: str = "graft_row"
    norm_decay: float = 0.999
    eps: float = 1e-8
    min_norm: float = 1e-2
    ridge: float = 1.0
    ridge_mode: str = "relative"
    cg_iters: int = 2
    cg_tol: float = 1e-5
    metric_backend: str = "auto"

    def __post_init__(self) -> None:
        for option in OPTIONS:
            option.check(option.name, getattr(self, option.name), "")
        if self.diagonal_only != (self.direction == "diagonal") and self.direction not in \
                ORTH_DIRECTIONS:
            raise ValueError(
                f"Invalid diagonal_only={self.diagonal_only!r} with direction="
                f"{self.direction!r}: diagonal_only=True is direction='diagonal' and False is "
                "'pcg'; give one of them.")
        if self.trust_region == "orth" and self.direction not in ORTH_DIRECTIONS:
            raise ValueError(f"Invalid trust_region='orth' with direction={self.direction!r}: "
                             "it scales an orthogonalised direction; use "
                             "direction='whitened_orth' or 'diag_whitened_orth'.")
        patterns = tuple(p.pattern for p in compile_patterns(self.skip_modules))
        object.__setattr__(self, "skip_modules", patterns)

    def inactive(self) -> dict[str, str]:
        """Options that change nothing under this configuration, with the reason."""
        return {o.name: o.why_not for o in OPTIONS if o.acts is not None and not o.acts(self)}

    def record(self) -> dict[str, Any]:
        """The optimizer-level options as plain Python values (what a checkpoint records)."""
        return {k: list(v) if k == "skip_modules" else v for k, v in
                ((k, getattr(self, k)) for k in (*STATE_OPTIONS, *FREE_OPTIONS))}


#: The presets. ``paper`` is ALGORITHM.md exactly; ``graft`` (the default before round 14 of
#: issue 13, now for models without linear layers in repeated blocks) was chosen by the
#: ablations in BENCHMARKS.md: SLNB's diagonal incomplete-Cholesky direction with Adam's step
#: size per output row (its ridge settings apply when ``diagonal_only=False`` is asked for).
PRESETS: dict[str, SLNBConfig] = {
    "graft": SLNBConfig(),
    "paper": SLNBConfig(preset="paper", lr=0.1, direction="pcg", diagonal_only=False,
                        trust_region="global", ridge=0.1, ridge_mode="absolute"),
    # Issue 13: Muon in whitened coordinates on the hidden matrices, Adam elsewhere; lr is AdamW's.
    # cov_rows=512: the same losses on GPT-2, the Llama and MiniLM as every row (round 5).
    # lr_scale=10: its best lr was 10x AdamW's on every task (round 13), so lr is AdamW's own.
    # cov_every=4: the inputs of one step in four, the same losses on every task as 3 (round 15)
    # and 1 (round 20); roots at most 8 steps old (whiten_every=10 rounds down to 2 updates).
    "whitened": SLNBConfig(preset="whitened", lr=1e-3, lr_scale=10.0, direction="whitened_orth",
                           diagonal_only=False, trust_region="orth", weight_decay=0.01,
                           cov_rows=512, cov_every=4),
}


def resolve(preset: Any = DEFAULT_PRESET, **given: Any) -> tuple[SLNBConfig, list[str]]:
    """The configuration for ``preset`` with every option in ``given`` that is not ``None``.

    Returns:
        The validated configuration and the names given explicitly that have no effect under
        it (for the caller's warning).

    Raises:
        ValueError: For an unknown preset or option, or a value out of range (naming it).
    """
    OPTION["preset"].check("preset", preset, "")
    unknown = sorted(set(given) - set(OPTION))
    if unknown:
        raise ValueError(f"Invalid option {unknown[0]!r}: must be one of {tuple(OPTION)}.")
    explicit = {k: v for k, v in given.items() if v is not None}
    for key, value in explicit.items():
        OPTION[key].check(key, value, "")
    if "diagonal_only" in explicit and "direction" not in explicit:  # the older shorthand
        explicit["direction"] = "diagonal" if explicit["diagonal_only"] else "pcg"
    elif "direction" in explicit and "diagonal_only" not in explicit:
        explicit["diagonal_only"] = explicit["direction"] == "diagonal"
    try:
        config = dataclasses.replace(PRESETS[preset], **explicit)
    except ValueError as err:
        if "trust_region" in explicit or PRESETS[preset].trust_region != "orth":
            raise
        raise ValueError(
            f"{err} That trust_region comes from preset {preset!r}: for SLNB's diagonal or "
            "conjugate-gradient direction pass preset='graft', or give trust_region too."
        ) from None
    inactive = config.inactive()
    return config, [k for k in explicit if k in inactive]


def no_effect_message(config: SLNBConfig, names: list[str]) -> str:
    """The warning for options given explicitly that change nothing under ``config``."""
    reasons = config.inactive()
    parts = "; ".join(f"{n}={getattr(config, n)!r} ({reasons[n]})" for n in names)
    return (f"SLNB (preset {config.preset!r}): these options have no effect: {parts}. Remove "
            "them, or choose the setting they belong to.")


def check_group(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the first invalid per-group hyperparameter."""
    for key in GROUP_KEYS:
        OPTION[key].check(key, group[key], where)


def register(table: dict[str, Any], cls: Any, what: str) -> Any:
    """Add ``cls`` to a registry under ``cls.name`` (``ValueError`` naming a taken name)."""
    if cls.name in table:
        raise ValueError(f"Invalid {what} name {cls.name!r}: already registered.")
    table[cls.name] = cls
    return cls


def docstring_table(indent: str = "") -> str:
    """The options as a reStructuredText list with each preset's value (generated, never
    written by hand: the constructor's docstring appends it)."""
    rows = []
    for o in OPTIONS:
        values = ", ".join(f"{name} {getattr(c, o.name)!r}" for name, c in PRESETS.items())
        rows.append(f"{indent}* ``{o.name}`` ({o.kind.__name__}; {values}): {o.help}")
    return "\n".join(rows)


def options_markdown() -> str:
    """``docs/OPTIONS.md``: every option, its presets' values, scope and meaning."""
    head = ("# SLNB options\n\nGenerated from `hf_slnb/config.py` by `python -m hf_slnb.config "
            "> docs/OPTIONS.md` (a test checks it is current). In the Trainer each option is "
            "`--slnb_<name>` or a key of `--optim_args` (except `lr` and `weight_decay`: "
            "`--learning_rate`, `--weight_decay`). `None`/unset takes the preset's value.\n\n"
            "| option | type | whitened (default for transformers) | graft (default otherwise) "
            "| paper | per group | in the state's meaning | meaning |\n"
            "|---|---|---|---|---|---|---|---|\n")
    rows = [f"| `{o.name}` | {o.kind.__name__} | `{getattr(PRESETS['whitened'], o.name)!r}` | "
            f"`{getattr(PRESETS['graft'], o.name)!r}` | "
            f"`{getattr(PRESETS['paper'], o.name)!r}` | {'yes' if o.per_group else 'no'} | "
            f"{'yes' if o.state else 'no'} | {o.help.replace('|', '/')} |" for o in OPTIONS]
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(options_markdown(), end="")


__all__ = ["BACKENDS", "DIRECTION_NAMES", "FREE_OPTIONS", "GROUP_KEYS", "OPTIONS", "PRESETS",
           "PRESET_NAMES", "RIDGE_MODES", "STATE_OPTIONS", "TRUST_REGIONS", "Option",
           "SLNBConfig", "check_group",
           "compile_patterns", "docstring_table", "no_effect_message", "resolve"]
