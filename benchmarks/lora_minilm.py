"""LoRA fine-tuning of MiniLM (``scripts/finetune_classification.py``'s task: KJV verses, Old vs
New Testament, 120 steps of 32) with PEFT: rank-8 adapters on the attention's query and value
projections, the classifier trained whole. Prints the held-out loss and accuracy as one JSON line
per (optimizer, lr, seed).

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/lora_minilm.py OPTIM LR,LR,... SEED,... [OPTIM_ARGS]
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import peft
from finetune_classification import (
    ScriptArguments,
    build_data,
    build_model,
    compute_metrics,
    load_tokenizer,
)
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

import hf_slnb

optim, lrs, seeds = sys.argv[1], [float(x) for x in sys.argv[2].split(",")], sys.argv[3]
extra = {"optim_args": sys.argv[4]} if len(sys.argv) > 4 else {}
script_args = ScriptArguments()
tokenizer = load_tokenizer(script_args)
train, held_out = build_data(script_args, tokenizer)
for lr in lrs:
    for seed in (int(s) for s in seeds.split(",")):
        model = peft.get_peft_model(build_model(script_args), peft.LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["query", "value"]))
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp, optim=optim, learning_rate=lr, num_train_epochs=1,
                per_device_train_batch_size=32, per_device_eval_batch_size=64,
                lr_scheduler_type="linear", warmup_steps=0.1, weight_decay=0.01,
                max_grad_norm=1.0, save_strategy="no", report_to="none", seed=seed,
                disable_tqdm=True, use_cpu=True, **extra)
            trainer = Trainer(model=model, args=args, train_dataset=train,
                              eval_dataset=held_out, data_collator=DataCollatorWithPadding(tokenizer),
                              compute_metrics=compute_metrics)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            metrics = trainer.evaluate()
            preset = getattr(hf_slnb.integration.unwrap_optimizer(trainer.optimizer), "preset",
                             None)
        print(json.dumps({"optim": optim, "preset": preset, "lr": lr, "seed": seed,
                          "eval_loss": round(metrics["eval_loss"], 4),
                          "accuracy": round(metrics["eval_accuracy"], 4)}), flush=True)
