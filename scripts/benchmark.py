#!/usr/bin/env python
"""SLNB against AdamW and strong peers, side by side: same model, data, seed and step budget.

Four tasks, built by the example scripts' own functions: ``clm`` pretrains the small GPT-2 of
``train_clm.py`` on Shakespeare, ``cls`` fine-tunes the MiniLM of ``finetune_classification.py``
on King James verses (Old vs New Testament), ``llama`` trains the byte-level Llama of
``ablate_llama.py`` on Shakespeare's bytes and ``clm10m`` is ``clm`` with a 10.5M GPT-2 for 1000
steps (the larger run). Every optimizer runs through the Hugging Face
``Trainer`` with a small learning-rate sweep:

* ``slnb``: ``--optim slnb`` (options from ``--slnb-args``; its default preset takes an Adam-like
  step, so its sweep is AdamW's; with ``--slnb-args preset=paper`` lr is a trust-region radius
  and the sweep is 0.1-1);
* ``adamw``: ``--optim adamw_torch``, the reference;
* ``schedulefree``: ``--optim schedule_free_adamw`` (package ``schedulefree``; constant schedule,
  the optimizer warms up itself);
* ``soap``: ``pytorch_optimizer.SOAP`` (package ``pytorch-optimizer``);
* ``muon``: ``pytorch_optimizer.Muon`` on the hidden weight matrices of the transformer blocks,
  AdamW (at the task's ``--muon-aux-lr``) on embeddings, heads, biases and norms;
* ``torch_muon``: ``torch.optim.Muon`` on the same matrices with Moonlight's
  ``adjust_lr_fn="match_rms_adamw"`` (update RMS 0.2 lr, symmetric in the two dimensions, so
  GPT-2's ``Conv1D`` is scaled like ``nn.Linear``) and AdamW on the rest, one lr for both (the
  fair Muon baseline: pytorch-optimizer's scales ``Conv1D`` by its stored ``(in, out)`` shape).

Per optimizer and learning rate it reports the final and best eval loss, the steps (and training
seconds) to reach AdamW's best final eval loss, the median time per step and the peak resident
memory growth of the run (each run is a forked process, so runs do not share allocator caches).
It prints a markdown table per task, writes it with PNG plots (eval loss against steps and
against training wall time) and ``results.json`` into ``--output-dir``, and with
``--write-benchmarks`` appends the tables, the command, the machine and the date to
``BENCHMARKS.md`` (plots copied into ``benchmarks/``).

Usage::

    python scripts/benchmark.py --quick                      # smoke test, about a minute
    python scripts/benchmark.py                              # the full sweep (hours on 2 CPU cores)
    python scripts/benchmark.py --tasks clm --optimizers slnb,adamw --seeds 0,1 \\
        --lr slnb=0.1,0.3,1 --lr adamw=1e-3,3e-3 --steps 300 --write-benchmarks
    python scripts/benchmark.py --tasks clm --optimizers slnb \\
        --slnb-args "cg_iters=0,diagonal_only=true"          # an ablation

``--lr [TASK:]OPTIMIZER=LR,LR,...`` replaces one sweep (for every task, or for ``TASK`` only).
A sweep split over several processes (2 cores: one per task), and SLNB variants run with
``--slnb-args``, are reported together, against one AdamW target, by ``--merge``::

    python scripts/benchmark.py --merge outputs/bench/clm outputs/bench/cls outputs/bench/variants \\
        --output-dir outputs/bench/all --write-benchmarks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from script_utils import set_offline

set_offline()

import finetune_classification as cls_script
import script_utils
import torch
import train_clm as clm_script
import transformers
from transformers import (
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_slnb

logger = logging.getLogger("benchmark")

OPTIMIZERS = ("slnb", "adamw", "schedulefree", "soap", "muon", "torch_muon")
TASKS = ("clm", "cls", "llama", "clm10m")


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------
@dataclass
class TaskSpec:
    """One benchmark task: its data and model builders, budget and default sweeps."""

    name: str
    title: str
    steps: int
    eval_every: int
    batch_size: int
    eval_batch_size: int
    scheduler: str
    warmup: float
    weight_decay: float
    lrs: dict[str, list[float]]
    #: SLNB's sweep where its lr is a trust-region radius (``--slnb-args preset=paper``).
    slnb_radius_lrs: list[float]
    muon_aux_lr: float
    #: Returns (train dataset, eval dataset, model factory taking nothing, collator, metrics fn).
    build: Callable[[], tuple[Any, Any, Callable[[], torch.nn.Module], Any, Any]]
    #: Qualified-name prefix of the transformer blocks (their 2-D weights go to Muon).
    blocks_prefix: str


def clm_task(quick: bool) -> TaskSpec:
    """GPT-2 pretraining on Shakespeare (``train_clm.py``'s data and model)."""
    args = clm_script.ScriptArguments()
    if quick:
        args = dataclasses.replace(args, max_corpus_chars=20_000, vocab_size=512, block_size=32,
                                   n_embd=32, n_layer=1, n_head=2, max_eval_samples=16)

    def build() -> tuple[Any, Any, Callable[[], torch.nn.Module], Any, Any]:
        tokenizer, train, held_out = clm_script.build_data(args)
        return train, held_out, lambda: clm_script.build_model(args, tokenizer), \
            default_data_collator, None

    return TaskSpec(
        name="clm", title=f"GPT-2 ({args.n_layer}x{args.n_embd}) pretraining on Shakespeare",
        steps=4 if quick else 300, eval_every=2 if quick else 25, batch_size=4 if quick else 16,
        eval_batch_size=32, scheduler="cosine", warmup=0.05, weight_decay=0.01,
        lrs={"slnb": [3e-4, 1e-3, 3e-3], "adamw": [1e-3, 3e-3, 1e-2],
             "schedulefree": [1e-3, 3e-3, 1e-2], "soap": [1e-3, 3e-3, 1e-2],
             "muon": [0.01, 0.03, 0.1], "torch_muon": [1e-3, 3e-3, 1e-2]},
        slnb_radius_lrs=[0.1, 0.3, 1.0], muon_aux_lr=3e-3, build=build,
        blocks_prefix="transformer.h.",
    )


def clm10m_task(quick: bool) -> TaskSpec:
    """The larger run: ``clm``'s data with a 10.5M GPT-2 (8x256, BPE vocabulary 16384) for 1000
    steps (the ``gpt2-10m`` of ``benchmark_step.py``)."""
    task = clm_task(quick)
    if quick:
        return dataclasses.replace(task, name="clm10m")
    args = dataclasses.replace(clm_script.ScriptArguments(), n_embd=256, n_layer=8, n_head=4,
                               vocab_size=16384)

    def build() -> tuple[Any, Any, Callable[[], torch.nn.Module], Any, Any]:
        tokenizer, train, held_out = clm_script.build_data(args)
        return train, held_out, lambda: clm_script.build_model(args, tokenizer), \
            default_data_collator, None

    return dataclasses.replace(task, name="clm10m", title="GPT-2 (8x256, 10.5M) pretraining on "
                               "Shakespeare", steps=1000, eval_every=100, build=build)


def cls_task(quick: bool) -> TaskSpec:
    """MiniLM fine-tuning on KJV testaments (``finetune_classification.py``'s data and model)."""
    args = cls_script.ScriptArguments()
    if quick:
        args = dataclasses.replace(args, max_train_samples=32, max_eval_samples=16,
                                   max_seq_length=24)

    def build() -> tuple[Any, Any, Callable[[], torch.nn.Module], Any, Any]:
        tokenizer = cls_script.load_tokenizer(args)
        train, held_out = cls_script.build_data(args, tokenizer)
        return train, held_out, lambda: cls_script.build_model(args), \
            DataCollatorWithPadding(tokenizer), cls_script.compute_metrics

    return TaskSpec(
        name="cls", title="MiniLM fine-tuning, KJV Old vs New Testament",
        steps=2 if quick else 150, eval_every=1 if quick else 25, batch_size=8 if quick else 32,
        eval_batch_size=64, scheduler="linear", warmup=0.1, weight_decay=0.01,
        lrs={"slnb": [3e-5, 1e-4, 3e-4], "adamw": [3e-5, 1e-4, 3e-4],
             "schedulefree": [1e-4, 3e-4, 1e-3], "soap": [3e-5, 1e-4, 3e-4],
             "muon": [1e-3, 3e-3, 1e-2], "torch_muon": [3e-5, 1e-4, 3e-4]},
        slnb_radius_lrs=[0.05, 0.1, 0.2], muon_aux_lr=1e-4, build=build,
        blocks_prefix="bert.encoder.",
    )


def llama_task(quick: bool) -> TaskSpec:
    """A byte-level Llama (4x128, SwiGLU, untied head) on Shakespeare's bytes (``ablate_llama.py``'s
    model and corpus), through the Trainer like the other tasks."""
    import ablate_llama

    block, n_train, n_eval = (32, 256, 8) if quick else (128, 20_000, 64)

    def build() -> tuple[Any, Any, Callable[[], torch.nn.Module], Any, Any]:
        raw = torch.tensor(list(ablate_llama.corpus_bytes()), dtype=torch.long)
        split = int(0.98 * raw.numel())
        train, held = raw[:split], raw[split:]
        # Fixed, evenly spread training windows (the same for every run), held-out eval blocks.
        starts = torch.linspace(0, train.numel() - block - 1, n_train).long().tolist()
        train_rows = [{"input_ids": train[s:s + block].tolist(),
                       "labels": train[s:s + block].tolist()} for s in starts]
        n = min(n_eval, (held.numel() - 1) // block)
        eval_rows = [{"input_ids": held[i * block:(i + 1) * block].tolist(),
                      "labels": held[i * block:(i + 1) * block].tolist()} for i in range(n)]

        def make_model() -> torch.nn.Module:
            from transformers import LlamaConfig, LlamaForCausalLM

            width = 32 if quick else 128
            return LlamaForCausalLM(LlamaConfig(
                vocab_size=256, hidden_size=width, intermediate_size=width * 43 // 16,
                num_hidden_layers=1 if quick else 4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=block,
                tie_word_embeddings=False))

        return train_rows, eval_rows, make_model, default_data_collator, None

    # clm's budget, schedule and sweeps; 400 steps (bytes carry less than BPE tokens).
    return dataclasses.replace(clm_task(quick), name="llama",
                               title="byte-level Llama (4x128) on Shakespeare",
                               steps=4 if quick else 400, build=build,
                               blocks_prefix="model.layers.")


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------
def muon_optimizer(model: torch.nn.Module, lr: float, aux_lr: float, weight_decay: float,
                   blocks_prefix: str) -> torch.optim.Optimizer:
    """Muon on the blocks' 2-D weights; AdamW on everything else (as Muon's authors do)."""
    from pytorch_optimizer import Muon

    hidden: list[torch.nn.Parameter] = []
    other: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (hidden if name.startswith(blocks_prefix) and p.ndim >= 2 else other).append(p)
    return Muon([
        {"params": hidden, "lr": lr, "weight_decay": weight_decay, "use_muon": True},
        {"params": other, "lr": aux_lr, "weight_decay": 0.0, "use_muon": False},
    ])


class _Chained(torch.optim.Optimizer):
    """Two optimizers stepped as one (Muon on the hidden matrices, AdamW on the rest); their
    param groups are shared, so the Trainer's scheduler and clipping see every group."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        super().__init__([g for o in optimizers for g in o.param_groups], {})

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for o, s in zip(self.optimizers, state_dict["optimizers"]):
            o.load_state_dict(s)


def torch_muon_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                         blocks_prefix: str) -> torch.optim.Optimizer:
    """``torch.optim.Muon`` on the blocks' 2-D weights, AdamW on the rest, one lr for both.

    ``adjust_lr_fn="match_rms_adamw"`` (Moonlight's rule, ``0.2 sqrt(max(A, B))``) makes the
    update's RMS AdamW's, so Muon takes AdamW's lr and weight decay, and, being symmetric in the
    two dimensions, scales GPT-2's ``Conv1D`` (stored ``(in, out)``) like ``nn.Linear``.
    """
    hidden: list[torch.nn.Parameter] = []
    other: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (hidden if name.startswith(blocks_prefix) and p.ndim == 2 else other).append(p)
    return _Chained(
        torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(other, lr=lr, weight_decay=weight_decay))


def trainer_kwargs(opt: str, lr: float, task: TaskSpec, model: torch.nn.Module,
                   slnb_args: str | None, adamw_beta2: float | None = None,
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``TrainingArguments`` overrides, ``Trainer`` keyword arguments) for one optimizer."""
    if opt == "slnb":
        return {"optim": "slnb", "optim_args": slnb_args or None}, {}
    if opt == "adamw":
        beta2 = {} if adamw_beta2 is None else {"adam_beta2": adamw_beta2}
        return {"optim": "adamw_torch", **beta2}, {}
    if opt == "schedulefree":
        # Schedule-free replaces the schedule: constant lr, warmup inside the optimizer.
        warmup = round(task.warmup * task.steps)
        return {"optim": "schedule_free_adamw", "lr_scheduler_type": "constant",
                "warmup_steps": warmup}, {}
    if opt == "soap":
        from pytorch_optimizer import SOAP

        # max_precondition_dim: the vocabulary side of the embeddings keeps the identity (a
        # 4096^2 or 30522^2 eigendecomposition every 10 steps would dominate any CPU budget).
        return {}, {"optimizer_cls_and_kwargs": (SOAP, {"lr": lr, "max_precondition_dim": 2048,
                                                        "precondition_frequency": 10})}
    if opt == "muon":
        optimizer = muon_optimizer(model, lr, task.muon_aux_lr, task.weight_decay,
                                   task.blocks_prefix)
        return {}, {"optimizers": (optimizer, None)}
    if opt == "torch_muon":
        optimizer = torch_muon_optimizer(model, lr, task.weight_decay, task.blocks_prefix)
        return {}, {"optimizers": (optimizer, None)}
    raise ValueError(f"Unknown optimizer {opt!r}: must be one of {', '.join(OPTIMIZERS)}.")


def check_available(optimizers: Sequence[str]) -> None:
    """Fail early, with the pip command, when a peer's package is missing."""
    need = {"schedulefree": ("schedulefree", "schedulefree"),
            "soap": ("pytorch_optimizer", "pytorch-optimizer"),
            "muon": ("pytorch_optimizer", "pytorch-optimizer")}
    for opt in optimizers:
        if opt not in OPTIMIZERS:
            raise SystemExit(f"Unknown optimizer {opt!r}: choose from {', '.join(OPTIMIZERS)}.")
        if opt == "torch_muon" and not hasattr(torch.optim, "Muon"):
            raise SystemExit(f"--optimizers torch_muon needs torch.optim.Muon (torch >= 2.9; this "
                             f"is torch {torch.__version__}).")
        if opt in need:
            module, package = need[opt]
            try:
                __import__(module)
            except ImportError:
                raise SystemExit(f"--optimizers {opt} needs `pip install {package}` "
                                 "(or leave it out of --optimizers).") from None


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    task: str
    optimizer: str
    lr: float
    seed: int
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # step, train s, loss
    accuracy: list[float] = field(default_factory=list)
    step_seconds: float = float("nan")
    rss_growth_mb: float = float("nan")
    cuda_peak_mb: float | None = None
    error: str | None = None
    variant: str = ""  # SLNB's --slnb-args, AdamW's "beta2=..." ("" for the defaults)

    @property
    def final_loss(self) -> float:
        return self.evals[-1][2] if self.evals else float("nan")

    @property
    def best_loss(self) -> float:
        return min((e[2] for e in self.evals), default=float("nan"))


def variant_of(opt: str, slnb_args: str | None, adamw_beta2: float | None) -> str:
    """How a run differs from its optimizer's defaults (its rows' label)."""
    if opt == "slnb":
        return slnb_args or ""
    if opt == "adamw" and adamw_beta2 is not None:
        return f"beta2={adamw_beta2:g}"
    return ""


def run_one(task: TaskSpec, data: tuple[Any, ...], opt: str, lr: float, seed: int,
            slnb_args: str | None, adamw_beta2: float | None = None) -> RunResult:
    """Train one (optimizer, lr, seed) from the same initial model; record evals and costs."""
    train, held_out, make_model, collator, metrics_fn = data
    result = RunResult(task.name, opt, lr, seed,
                       variant=variant_of(opt, slnb_args, adamw_beta2))
    with script_utils.PeakRSS() as memory, tempfile.TemporaryDirectory() as tmp:
        set_seed(seed)
        model = make_model()
        overrides, extra = trainer_kwargs(opt, lr, task, model, slnb_args, adamw_beta2)
        args = TrainingArguments(**{
            "output_dir": tmp, "max_steps": task.steps, "learning_rate": lr,
            "per_device_train_batch_size": task.batch_size,
            "per_device_eval_batch_size": task.eval_batch_size,
            "lr_scheduler_type": task.scheduler, "warmup_steps": task.warmup,
            "weight_decay": task.weight_decay, "max_grad_norm": 1.0, "eval_strategy": "steps",
            "eval_steps": task.eval_every, "eval_on_start": True, "logging_steps": task.eval_every,
            "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": seed,
            "dataloader_pin_memory": torch.cuda.is_available(),
            **overrides,
        })
        timer = script_utils.StepTimer()
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                          data_collator=collator, compute_metrics=metrics_fn, callbacks=[timer],
                          **extra)
        trainer.remove_callback(PrinterCallback)  # the table is the report, not every log line
        trainer.train()
        if not timer.evals or timer.evals[-1][0] != trainer.state.global_step:
            trainer.evaluate()
    result.evals = [(s, t, float(m["eval_loss"])) for s, t, m in timer.evals]
    result.accuracy = [float(m.get("eval_accuracy", float("nan"))) for _, _, m in timer.evals]
    result.step_seconds = timer.median_step_seconds
    result.rss_growth_mb = memory.growth_mb
    result.cuda_peak_mb = memory.cuda_peak_mb
    return result


def _child(conn: Any, task: TaskSpec, data: tuple[Any, ...], opt: str, lr: float, seed: int,
           slnb_args: str | None, adamw_beta2: float | None) -> None:
    try:
        conn.send(run_one(task, data, opt, lr, seed, slnb_args, adamw_beta2))
    except BaseException:  # noqa: BLE001 - reported to the parent, which keeps going
        conn.send(RunResult(task.name, opt, lr, seed, error=traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(task: TaskSpec, data: tuple[Any, ...], opt: str, lr: float, seed: int,
                 slnb_args: str | None, isolate: bool,
                 adamw_beta2: float | None = None) -> RunResult:
    """:func:`run_one` in a forked child (clean memory accounting), or in this process."""
    if not isolate:
        try:
            return run_one(task, data, opt, lr, seed, slnb_args, adamw_beta2)
        except Exception:  # noqa: BLE001
            return RunResult(task.name, opt, lr, seed, error=traceback.format_exc())
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child,
                       args=(child, task, data, opt, lr, seed, slnb_args, adamw_beta2))
    proc.start()
    child.close()
    try:
        result: RunResult = parent.recv()
    except EOFError:
        result = RunResult(task.name, opt, lr, seed,
                           error=f"the run's process died (exit code {proc.exitcode})")
    proc.join()
    return result


# ---------------------------------------------------------------------------------------------
# Aggregation and reports
# ---------------------------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else float("nan")


def mean_curve(runs: Sequence[RunResult]) -> list[tuple[int, float, float]]:
    """Eval curve averaged over seeds (steps common to every run): step, train s, loss."""
    if not runs:
        return []
    steps = sorted(set.intersection(*({s for s, _, _ in r.evals} for r in runs)))
    out = []
    for step in steps:
        points = [next(e for e in r.evals if e[0] == step) for r in runs]
        out.append((step, _mean([p[1] for p in points]), _mean([p[2] for p in points])))
    return out


@dataclass
class Row:
    optimizer: str
    variant: str
    lr: float
    final: float
    final_sd: float
    best: float
    steps_to_target: int | None
    seconds_to_target: float | None
    step_seconds: float
    rss_mb: float
    cuda_mb: float | None
    accuracy: float
    curve: list[tuple[int, float, float]]
    errors: int
    seeds: int

    @property
    def name(self) -> str:
        return self.optimizer + (f" ({self.variant})" if self.variant else "")


def summarise(runs: Sequence[RunResult]) -> tuple[list[Row], float]:
    """One row per (optimizer, variant, lr) of a task, and the AdamW target loss (nan without)."""
    groups: dict[tuple[str, str, float], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.optimizer, r.variant, r.lr), []).append(r)
    finals = {key: _mean([r.final_loss for r in rs if not r.error]) for key, rs in groups.items()}
    adamw = [v for (opt, _, _), v in finals.items() if opt == "adamw" and not math.isnan(v)]
    target = min(adamw) if adamw else float("nan")
    rows = []
    for (opt, variant, lr), rs in groups.items():
        ok = [r for r in rs if not r.error]
        curve = mean_curve(ok)
        hit = next((e for e in curve if e[2] <= target), None) if not math.isnan(target) else None
        finals_ok = [r.final_loss for r in ok]
        cuda = [r.cuda_peak_mb for r in ok if r.cuda_peak_mb is not None]
        rows.append(Row(
            optimizer=opt, variant=variant, lr=lr, final=_mean(finals_ok),
            final_sd=statistics.stdev(finals_ok) if len(finals_ok) > 1 else float("nan"),
            best=_mean([r.best_loss for r in ok]),
            steps_to_target=hit[0] if hit else None, seconds_to_target=hit[1] if hit else None,
            step_seconds=_mean([r.step_seconds for r in ok]),
            rss_mb=_mean([r.rss_growth_mb for r in ok]), cuda_mb=_mean(cuda) if cuda else None,
            accuracy=_mean([r.accuracy[-1] for r in ok if r.accuracy]), curve=curve,
            errors=len(rs) - len(ok), seeds=len(ok),
        ))
    rows.sort(key=lambda row: (OPTIMIZERS.index(row.optimizer), row.variant, row.lr))
    return rows, target


def best_rows(rows: Sequence[Row]) -> dict[str, Row]:
    """The lr with the lowest mean final eval loss, per optimizer (and SLNB variant)."""
    best: dict[str, Row] = {}
    for row in rows:
        if math.isnan(row.final):
            continue
        if row.name not in best or row.final < best[row.name].final:
            best[row.name] = row
    return best


def markdown_table(task: TaskSpec, rows: Sequence[Row], target: float) -> str:
    """The markdown report of one task (best lr per optimizer in bold)."""
    best = best_rows(rows)
    with_acc = any(not math.isnan(r.accuracy) for r in rows)
    with_cuda = any(r.cuda_mb is not None for r in rows)
    head = ["optimizer", "lr", "seeds", "final eval loss", "best eval loss",
            "steps to AdamW's best", "train s to it", "s/step", "peak RSS growth (MB)"]
    if with_cuda:
        head.append("CUDA peak (MB)")
    if with_acc:
        head.append("final accuracy")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = "**" if best.get(r.name) is r else ""
        sd = f" ± {r.final_sd:.3f}" if not math.isnan(r.final_sd) else ""
        cells = [
            f"{mark}{r.name}{mark}", f"{r.lr:g}", str(r.seeds),
            f"{mark}{r.final:.4f}{mark}{sd}" if not math.isnan(r.final) else "failed",
            f"{r.best:.4f}" if not math.isnan(r.best) else "-",
            str(r.steps_to_target) if r.steps_to_target is not None else "not reached",
            f"{r.seconds_to_target:.1f}" if r.seconds_to_target is not None else "-",
            f"{r.step_seconds:.3f}", f"{r.rss_mb:.0f}",
        ]
        if with_cuda:
            cells.append(f"{r.cuda_mb:.0f}" if r.cuda_mb is not None else "-")
        if with_acc:
            cells.append(f"{r.accuracy:.4f}" if not math.isnan(r.accuracy) else "-")
        if r.errors:
            cells[0] += f" ({r.errors} failed)"
        lines.append("| " + " | ".join(cells) + " |")
    target_text = f"{target:.4f}" if not math.isnan(target) else "n/a (AdamW not run)"
    return (f"### {task.title}\n\n{task.steps} steps, batch {task.batch_size}, {task.scheduler} "
            f"schedule with {task.warmup:.0%} warmup (schedule-free: constant), weight decay "
            f"{task.weight_decay}, evaluation every {task.eval_every} steps; losses are means over "
            f"the seeds. AdamW's best final eval loss (the target): {target_text}. Bold: the "
            "best lr of each optimizer. Times exclude evaluation.\n\n" + "\n".join(lines)
            + "\n")


def plot_task(task: TaskSpec, rows: Sequence[Row], path: Path) -> Path:
    """Eval loss against steps and against training seconds; best lr bold, others faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_rows(rows)
    names = list(dict.fromkeys(r.name for r in rows))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = {name: palette(i % palette.N) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for r in rows:
        if not r.curve:
            continue
        steps, seconds, losses = zip(*r.curve)
        is_best = best.get(r.name) is r
        style = {"color": colors[r.name], "alpha": 1.0 if is_best else 0.25,
                 "linewidth": 2.0 if is_best else 1.0, "linestyle": "--" if r.variant else "-",
                 "label": f"{r.name} lr={r.lr:g}" if is_best else None}
        axes[0].plot(steps, losses, **style)
        axes[1].plot(seconds, losses, **style)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training wall time (s, evaluation excluded)")
    axes[0].set_ylabel("eval loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{task.title} (faint: other learning rates)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_lr_overrides(items: Sequence[str], tasks: Sequence[str]) -> dict[tuple[str, str],
                                                                            list[float]]:
    """``--lr [TASK:]OPT=LR,...`` -> {(task, opt): [lr, ...]}."""
    out: dict[tuple[str, str], list[float]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        task_name, _, opt = key.rpartition(":")
        if not sep or opt not in OPTIMIZERS or (task_name and task_name not in TASKS):
            raise SystemExit(f"Invalid --lr {item!r}: expected [TASK:]OPTIMIZER=LR,LR,... with "
                             f"TASK in {TASKS} and OPTIMIZER in {OPTIMIZERS}.")
        try:
            lrs = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"Invalid --lr {item!r}: learning rates must be numbers.") from None
        for t in [task_name] if task_name else tasks:
            out[(t, opt)] = lrs
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="clm,cls", help="Comma-separated: clm, cls, llama, clm10m.")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"Comma-separated subset of {', '.join(OPTIMIZERS)}.")
    parser.add_argument("--lr", action="append", default=[], metavar="[TASK:]OPT=LR,...",
                        help="Learning rates of one optimizer's sweep (repeatable).")
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds (model init and "
                        "data order). Default 0,1 (0 with --quick).")
    parser.add_argument("--steps", type=int, default=None, help="Step budget of every task "
                        "(default: clm 300, cls 150).")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="Evaluate every N steps (default 25).")
    parser.add_argument("--slnb-args", default="", help="SLNB options as 'key=value,...' "
                        "(e.g. 'cg_iters=4,ridge=0.05'); passed as --optim_args.")
    parser.add_argument("--adamw-beta2", type=float, default=None, metavar="BETA2",
                        help="AdamW's beta2 for the adamw runs, in (0, 1) (default: the "
                        "Trainer's 0.999); the rows are labelled 'adamw (beta2=...)'.")
    parser.add_argument("--output-dir", default="outputs/benchmark")
    parser.add_argument("--write-benchmarks", action="store_true",
                        help="Append the tables to BENCHMARKS.md (plots to benchmarks/).")
    parser.add_argument("--benchmarks-file", default="BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="Tiny models and data, a few steps, "
                        "the middle learning rate of each sweep, one seed (smoke test).")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for every run (0: torch's default; 1 is "
                        "often fastest on a busy shared CPU).")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="Run nothing: report the runs of earlier benchmarks together (their "
                        "--output-dir folders or results.json files; e.g. a sweep split over "
                        "several processes, plus SLNB variants run with --slnb-args).")
    parser.add_argument("--no-isolate", action="store_true",
                        help="Run every configuration in this process (no fork; memory numbers "
                        "are then only indicative).")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; print, write and return the tables."""
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # forked runs inherit it
    hf_slnb.register()
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_error()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"Unknown task {t!r}: choose from {', '.join(TASKS)}.")
    check_available(optimizers)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")
             if s.strip()]
    slnb_args = args.slnb_args.strip() or None
    if slnb_args:  # fail now, not in every run
        from hf_slnb.integration import parse_optim_args

        parse_optim_args(slnb_args)
    if args.adamw_beta2 is not None and not 0.0 < args.adamw_beta2 < 1.0:
        raise SystemExit(f"Invalid --adamw-beta2 {args.adamw_beta2!r}: must be in (0, 1).")
    overrides = parse_lr_overrides(args.lr, tasks)
    isolate = not args.no_isolate and "fork" in multiprocessing.get_all_start_methods()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    builders = {"clm": clm_task, "cls": cls_task, "llama": llama_task, "clm10m": clm10m_task}
    reports: dict[str, Any] = {}
    tables = []
    for name in tasks:
        task = builders[name](args.quick)
        if args.steps is not None:
            task.steps = args.steps
        if args.eval_every is not None:
            task.eval_every = args.eval_every
        sweeps = {}
        radius = "slnb" in optimizers and script_utils.slnb_lr_is_radius(slnb_args)
        for opt in optimizers:
            grid = task.slnb_radius_lrs if opt == "slnb" and radius else task.lrs[opt]
            lrs = overrides.get((name, opt), grid)
            if args.quick and (name, opt) not in overrides:
                lrs = [lrs[len(lrs) // 2]]
            sweeps[opt] = lrs
        n_runs = sum(len(v) for v in sweeps.values()) * len(seeds)
        logger.info("%s: %d runs of %d steps (%s)", task.title, n_runs, task.steps,
                    ", ".join(f"{o} lr {v}" for o, v in sweeps.items()))
        data = task.build()
        runs = []
        for seed in seeds:
            for opt, lrs in sweeps.items():
                for lr in lrs:
                    r = run_isolated(task, data, opt, lr, seed, slnb_args, isolate,
                                     args.adamw_beta2)
                    if r.error:
                        logger.warning("%s %s lr=%g seed=%d failed:\n%s", name, opt, lr, seed,
                                       r.error)
                    else:
                        logger.info("%s %s lr=%g seed=%d: final eval loss %.4f, %.3f s/step, "
                                    "+%.0f MB", name, opt, lr, seed, r.final_loss, r.step_seconds,
                                    r.rss_growth_mb)
                    runs.append(r)
        reports[name] = report_task(task, runs, out, tables)
        reports[name]["sweeps"] = sweeps

    meta = {"command": script_utils.command_line(), "machine": script_utils.machine_description(),
            "date": script_utils.today(), "seeds": seeds, "slnb_args": slnb_args,
            "adamw_beta2": args.adamw_beta2, "versions": script_utils.framework_versions()}
    return finish(args, out, meta, reports, tables)


def report_task(task: TaskSpec, runs: Sequence[RunResult], out: Path,
                tables: list[tuple[TaskSpec, str, Path]]) -> dict[str, Any]:
    """Table and plot of one task's runs (printed, and added to ``tables``)."""
    rows, target = summarise(runs)
    table = markdown_table(task, rows, target)
    plot = plot_task(task, rows, out / f"benchmark_{task.name}.png")
    print("\n" + table, flush=True)
    tables.append((task, table, plot))
    return {"title": task.title, "target": target, "steps": task.steps,
            "runs": [dataclasses.asdict(r) for r in runs], "table": table}


def finish(args: argparse.Namespace, out: Path, meta: dict[str, Any],
           reports: dict[str, Any], tables: list[tuple[TaskSpec, str, Path]]) -> dict[str, Any]:
    """Write ``results.json`` (and ``BENCHMARKS.md`` with ``--write-benchmarks``)."""
    (out / "results.json").write_text(json.dumps({**meta, "tasks": reports}, indent=2,
                                                 default=str), encoding="utf-8")
    if args.write_benchmarks:
        append_benchmarks(Path(args.benchmarks_file), tables, meta)
    return {"meta": meta, "tasks": reports}


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """``--merge``: one report from the ``results.json`` of several earlier benchmark runs."""
    runs: dict[str, list[RunResult]] = {}
    steps: dict[str, int] = {}
    sources: list[dict[str, Any]] = []
    fields = {f.name for f in dataclasses.fields(RunResult)}
    for item in args.merge:
        path = Path(item) / "results.json" if Path(item).is_dir() else Path(item)
        if not path.is_file():
            raise SystemExit(f"--merge {item}: no results.json there (run benchmark.py with "
                             "--output-dir first).")
        data = json.loads(path.read_text(encoding="utf-8"))
        sources.append(data)
        for name, report in data["tasks"].items():
            steps[name] = report["steps"]
            for d in report["runs"]:
                d = {k: v for k, v in d.items() if k in fields}
                if "variant" not in d:  # results written before runs recorded their variant
                    d["variant"] = (data.get("slnb_args") or "") if d["optimizer"] == "slnb" else ""
                d["evals"] = [tuple(e) for e in d["evals"]]
                runs.setdefault(name, []).append(RunResult(**d))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders = {"clm": clm_task, "cls": cls_task, "llama": llama_task, "clm10m": clm10m_task}
    reports: dict[str, Any] = {}
    tables: list[tuple[TaskSpec, str, Path]] = []
    for name, task_runs in runs.items():
        task = builders[name](False)
        task.steps = steps[name]
        points = sorted({e[0] for r in task_runs for e in r.evals})
        if len(points) > 1:
            task.eval_every = points[1] - points[0]
        reports[name] = report_task(task, task_runs, out, tables)
    first = sources[0]
    meta = {"command": script_utils.command_line(), "machine": first["machine"],
            "date": first["date"], "sources": [s["command"] for s in sources],
            "versions": first["versions"]}
    return finish(args, out, meta, reports, tables)


def append_benchmarks(path: Path, tables: Sequence[tuple[TaskSpec, str, Path]],
                      meta: dict[str, Any]) -> None:
    """Append one dated section to ``BENCHMARKS.md``; copy the plots next to it."""
    plots_dir = path.parent / "benchmarks"
    plots_dir.mkdir(parents=True, exist_ok=True)
    stamp = meta["date"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    parts = [f"\n## {stamp}: `benchmark.py`\n",
             f"- command: `{meta['command']}`"]
    parts += [f"  - merging the runs of `{source}`" for source in meta.get("sources", [])]
    parts += [f"- machine: {meta['machine']}", f"- versions: {versions}\n"]
    for task, table, plot in tables:
        target, n = plots_dir / f"{stamp}_{task.name}.png", 1
        while target.exists():  # several benchmarks on one day
            n += 1
            target = plots_dir / f"{stamp}_{task.name}_{n}.png"
        shutil.copyfile(plot, target)
        rel = os.path.relpath(target, path.parent)
        parts.append(table)
        parts.append(f"![{task.title}]({rel})\n")
    new = not path.exists()
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmarks\n\nAppended by `python scripts/benchmark.py --write-benchmarks`."
                    "\n")
        f.write("\n".join(parts))
    logger.info("appended to %s", path)


if __name__ == "__main__":
    main()
