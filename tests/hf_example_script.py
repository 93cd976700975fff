#!/usr/bin/env python
"""A training script written like Hugging Face's examples (``run_clm.py``, ``run_glue.py``).

It never imports ``hf_slnb``: with the package installed, ``--optim slnb`` works through the
``.pth`` auto-registration alone. The model is built from a tiny config and the data are made up
(offline), so the script runs with no download::

    python tests/hf_example_script.py --output_dir /tmp/out --optim slnb --max_steps 8
    torchrun --nproc_per_node 2 tests/hf_example_script.py --use_cpu true --output_dir /tmp/out \
        --optim slnb --max_steps 8
    accelerate launch --multi_gpu --num_processes 2 tests/hf_example_script.py --use_cpu true \
        --output_dir /tmp/out --optim slnb --max_steps 8

Tasks: ``--model_type gpt2`` (causal LM: each token is the previous one plus one, modulo the
vocabulary) or ``--model_type bert`` (sequence classification: is the first token even).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which tiny model to build from its config."""

    model_type: str = field(default="gpt2", metadata={"help": "gpt2 or bert.", "choices": ["gpt2", "bert"]})
    hidden_size: int = field(default=32, metadata={"help": "Width of the model."})
    num_layers: int = field(default=2, metadata={"help": "Number of transformer blocks."})
    num_heads: int = field(default=2, metadata={"help": "Attention heads per block."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout probability everywhere."})


@dataclass
class DataTrainingArguments:
    """The made-up data."""

    vocab_size: int = field(default=64, metadata={"help": "Vocabulary size."})
    block_size: int = field(default=16, metadata={"help": "Tokens per example."})
    max_train_samples: int = field(default=256, metadata={"help": "Training examples."})
    max_eval_samples: int = field(default=32, metadata={"help": "Evaluation examples."})
    data_seed_offset: int = field(default=0, metadata={"help": "Added to --seed for the data."})


def build_model(model_args: ModelArguments, data_args: DataTrainingArguments) -> torch.nn.Module:
    common = {"vocab_size": data_args.vocab_size, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2}
    if model_args.model_type == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", n_embd=model_args.hidden_size, n_layer=model_args.num_layers,
            n_head=model_args.num_heads, n_positions=data_args.block_size,
            resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout,
            attn_pdrop=model_args.dropout, **common,
        )
        return AutoModelForCausalLM.from_config(config)
    config = AutoConfig.for_model(
        "bert", hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_layers,
        num_attention_heads=model_args.num_heads, intermediate_size=2 * model_args.hidden_size,
        max_position_embeddings=data_args.block_size, num_labels=2,
        hidden_dropout_prob=model_args.dropout, attention_probs_dropout_prob=model_args.dropout,
        **common,
    )
    return AutoModelForSequenceClassification.from_config(config)


def build_dataset(model_type: str, data_args: DataTrainingArguments, n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, data_args.vocab_size, (n, 1), generator=g)
    ids = 3 + (start - 3 + torch.arange(data_args.block_size)) % (data_args.vocab_size - 3)
    if model_type == "gpt2":
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    ids = torch.randint(3, data_args.vocab_size, (n, data_args.block_size), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")

    set_seed(training_args.seed)
    model = build_model(model_args, data_args)
    seed = training_args.seed + data_args.data_seed_offset
    train_dataset = build_dataset(model_args.model_type, data_args, data_args.max_train_samples, seed)
    eval_dataset = build_dataset(model_args.model_type, data_args, data_args.max_eval_samples, seed + 1)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": None, "tasks": "text-generation" if model_args.model_type == "gpt2"
              else "text-classification"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)

    if trainer.is_world_process_zero():
        # What the tests read: which optimizer ran, and a digest of the final weights.
        optimizer = trainer.optimizer
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        digest = {n: float(p.detach().double().sum()) for n, p in trainer.model.named_parameters()}
        with open(os.path.join(training_args.output_dir, "run_info.json"), "w") as f:
            json.dump({"optimizer_mro": [c.__name__ for c in type(optimizer).__mro__],
                       "learning_rate": training_args.learning_rate,
                       "world_size": training_args.world_size,
                       "log_history": trainer.state.log_history,
                       "weights": digest}, f)


if __name__ == "__main__":
    main()
