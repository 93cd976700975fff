#!/usr/bin/env python
"""A plain training loop on the MiniLM fine-tuning task, for quick side-by-side diagnoses.

``finetune_classification.py``'s data and pretrained model, without the Trainer: batches of 32
drawn with a fixed generator, gradient clipping at 1.0, a constant lr, training mode (dropout
on), and every 10 steps the mean training loss of those 10 steps and the eval loss on 128
held-out verses. Issue 13, round 4 used it to find why ``preset="whitened"`` did not learn this
task (BENCHMARKS.md, "Issue 13, round 4")::

    python scripts/minilm_loop.py --optimizer slnb --slnb-args preset=whitened --lr 3e-4
    python scripts/minilm_loop.py --optimizer slnb --lr 3e-4 \\
        --slnb-args preset=whitened,orth_layers=hidden                  # the rule before round 4
    python scripts/minilm_loop.py --optimizer torch_muon --lr 3e-4
    python scripts/minilm_loop.py --optimizer adamw --lr 1e-4

``--damping`` overrides the whitening's ridge (a fraction of the covariance's mean eigenvalue,
0.1 in the package; ``1e6`` makes ``C^-1/2`` a multiple of the identity, i.e. Muon's direction).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from script_utils import set_offline

set_offline()

import torch

sys.path.insert(0, str(Path(__file__).parent))
import benchmark
import benchmark_step
import finetune_classification as cls
from transformers import DataCollatorWithPadding

KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids")


def main(argv: list[str] | None = None) -> list[tuple[int, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=("slnb", "adamw", "torch_muon"), default="slnb")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--slnb-args", default="preset=whitened")
    parser.add_argument("--damping", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-samples", type=int, default=None)
    args = parser.parse_args(argv)

    script_args = cls.ScriptArguments()
    if args.max_train_samples:
        script_args.max_train_samples = args.max_train_samples
        script_args.max_eval_samples = min(script_args.max_eval_samples, args.max_train_samples)
    tokenizer = cls.load_tokenizer(script_args)
    train, held = cls.build_data(script_args, tokenizer)
    collate = DataCollatorWithPadding(tokenizer)
    torch.manual_seed(args.seed)
    model = cls.build_model(script_args)
    model.train()
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    elif args.optimizer == "torch_muon":
        opt = benchmark.torch_muon_optimizer(model, args.lr, 0.01, "bert.encoder.")
    else:
        from hf_slnb import SLNB
        from hf_slnb.directions import WhitenedOrth

        if args.damping is not None:
            WhitenedOrth.damping = args.damping
        options = benchmark_step.parse_kv(args.slnb_args)
        opt = SLNB(model.parameters(), model=model, lr=args.lr, **options)

    def batch_of(rows: list[int], data: object) -> dict[str, torch.Tensor]:
        batch = collate([data[i] for i in rows])  # type: ignore[index]
        return {k: v for k, v in batch.items() if k in KEYS}

    held_batch = batch_of(list(range(min(128, len(held)))), held)
    gen = torch.Generator().manual_seed(args.seed)
    losses, out, t0 = [], [], time.time()
    for step in range(args.steps):
        rows = torch.randint(0, len(train), (32,), generator=gen).tolist()
        loss = model(**batch_of(rows, train)).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 10 == 9 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                eval_loss = model(**held_batch).loss.item()
            model.train()
            train_loss = sum(losses[-10:]) / len(losses[-10:])
            out.append((step + 1, train_loss, eval_loss))
            print(f"step {step + 1}: train {train_loss:.4f} eval {eval_loss:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return out


if __name__ == "__main__":
    main()
