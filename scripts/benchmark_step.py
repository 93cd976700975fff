"""Per-step time and peak memory of SLNB against torch AdamW, side by side.

Each model trains for a few steps with each optimizer, interleaved in one process, on random
tokens (batch 16 x 128 by default); the median of forward + backward + step is reported. Peak
memory is the growth of the resident set during training, measured in a fresh subprocess per
(model, optimizer) so that one run cannot hide in another's high-water mark.

Usage:
    python scripts/benchmark_step.py                         # all three models, defaults
    python scripts/benchmark_step.py --models gpt2-10m --steps 8 --slnb-args cg_iters=1
    python scripts/benchmark_step.py --profile gpt2-10m      # where SLNB's time goes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

MODELS = {
    "gpt2-tiny": ("gpt2", dict(n_embd=128, n_layer=2, n_head=2, vocab_size=8192)),
    "gpt2-10m": ("gpt2", dict(n_embd=256, n_layer=8, n_head=4, vocab_size=16384)),
    "minilm": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, vocab_size=30522)),
}


def build(name: str, seq: int) -> torch.nn.Module:
    """A randomly initialised model of the named size (no download)."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    family, kw = MODELS[name]
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_positions=seq, **kw))
    return BertForMaskedLM(BertConfig(max_position_embeddings=max(seq, 512), **kw))


def make_optimizer(kind: str, model: torch.nn.Module, slnb_args: dict[str, Any]) -> Any:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    from hf_slnb import SLNB

    return SLNB(model.parameters(), model=model, **slnb_args)


def comm_floats(name: str, batch: int, seq: int, slnb_args: dict[str, Any]) -> tuple[int, int]:
    """Floats SLNB all-reduces per step in data parallel, and floats of the gradient all-reduce."""
    from hf_slnb.layers import ConvNeuron

    model = build(name, seq)
    opt = make_optimizer("slnb", model, slnb_args)
    data = torch.randint(0, model.config.vocab_size, (batch, seq))
    model(input_ids=data, labels=data).loss.backward()
    extra = 0
    for n in opt.neurons:
        if n.capture is None:
            continue
        if n.capture.gram is None and n.supports_explicit and not opt.diagonal_only:
            n.capture = n._new_capture(True)  # what a data-parallel run would choose
        extra += sum(t.numel() for t in n.capture.tensors())
        if isinstance(n, ConvNeuron) and not opt.diagonal_only:  # products reduced per PCG iteration
            extra += (opt.param_groups[0]["cg_iters"] + 1) * (n.weight.numel() + (
                n.bias.numel() if n.bias is not None else 0))
    grads = sum(p.numel() for p in model.parameters() if p.grad is not None)
    return extra, grads


def one_step(model: torch.nn.Module, opt: Any, batch: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def parse_kv(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if value in ("True", "False"):
            out[key] = value == "True"
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a string option, e.g. preset=paper
    return out


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory_worker(name: str, kind: str, steps: int, batch: int, seq: int, slnb_args: dict) -> None:
    """Print the peak RSS growth (MiB) of training one model with one optimizer."""
    model = build(name, seq)
    model.train()
    data = torch.randint(0, model.config.vocab_size, (batch, seq))
    base = rss_kib()
    opt = make_optimizer(kind, model, slnb_args)
    for _ in range(steps):
        one_step(model, opt, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def time_models(name: str, steps: int, batch: int, seq: int, slnb_args: dict) -> dict[str, float]:
    """Median step time of each optimizer, interleaved step by step in one process."""
    models = {k: build(name, seq) for k in ("adamw", "slnb")}
    opts = {k: make_optimizer(k, m, slnb_args) for k, m in models.items()}
    data = torch.randint(0, models["adamw"].config.vocab_size, (batch, seq))
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 2):
        for k in models:
            t = one_step(models[k], opts[k], data)
            if i >= 2:  # two warm-up steps
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def profile(name: str, batch: int, seq: int, slnb_args: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = build(name, seq)
    opt = make_optimizer("slnb", model, slnb_args)
    data = torch.randint(0, model.config.vocab_size, (batch, seq))
    one_step(model, opt, data)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(model, opt, data)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-tiny,gpt2-10m,minilm")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--slnb-args", default="", help='e.g. "cg_iters=1,diagonal_only=True"')
    parser.add_argument("--profile", default=None, help="profile one SLNB step of this model")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "OPT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    slnb_args = parse_kv(args.slnb_args)
    if args.memory_worker:
        memory_worker(*args.memory_worker, 3, args.batch, args.seq, slnb_args)
        return
    if args.profile:
        profile(args.profile, args.batch, args.seq, slnb_args)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}x{args.seq},"
          f" slnb {slnb_args or 'defaults'}")
    print("| model | params | AdamW step (s) | SLNB step (s) | time ratio | AdamW peak (MiB) |"
          " SLNB peak (MiB) | memory ratio | SLNB all-reduce / gradient all-reduce |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        n_params = sum(p.numel() for p in build(name, args.seq).parameters())
        t = time_models(name, args.steps, args.batch, args.seq, slnb_args)
        comm = comm_floats(name, args.batch, args.seq, slnb_args)
        mem = {}
        for kind in ("adamw", "slnb"):
            if args.skip_memory:
                mem[kind] = float("nan")
                continue
            cmd = [sys.executable, __file__, "--memory-worker", name, kind, "--batch",
                   str(args.batch), "--seq", str(args.seq), "--slnb-args", args.slnb_args]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            mem[kind] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
        print(f"| {name} | {n_params / 1e6:.1f}M | {t['adamw']:.3f} | {t['slnb']:.3f} |"
              f" {t['slnb'] / t['adamw']:.2f} | {mem['adamw']:.0f} | {mem['slnb']:.0f} |"
              f" {mem['slnb'] / mem['adamw']:.2f} | {comm[0] / comm[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
