"""Per-step time and peak memory of SLNB against torch AdamW, side by side.

Each model trains for a few steps with each optimizer, interleaved in one process, on random
tokens (batch 16 x 128 by default); the median of forward + backward + step is reported. Peak
memory is the growth of the resident set during training, measured in a fresh subprocess per
(model, optimizer) so that one run cannot hide in another's high-water mark.

Usage:
    python scripts/benchmark_step.py                         # all three models, defaults
    python scripts/benchmark_step.py --models gpt2-10m --steps 8 --slnb-args cg_iters=1
    python scripts/benchmark_step.py --profile gpt2-10m      # where SLNB's time goes
    python scripts/benchmark_step.py --count-ops --out counts.json   # ops and host syncs

``--count-ops`` counts instead of timing: every aten op that ``optimizer.step()`` and the
forward/backward dispatch on the CPU in steady state (after ``--warmup`` steps), the extra ops
the optimizer's hooks add per hooked layer and micro-batch (against the same model trained with
AdamW, which has no hooks), and the ops among them that force a device->host sync on CUDA, by
kind and by source line (see ``SYNC_KINDS``). Default models: the two 12-layer models of issue 10
(``gpt2-12l``, ``llama-12l``); optimizers: AdamW(foreach=True), SLNB, SLNB(preset="paper").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

MODELS = {
    "gpt2-tiny": ("gpt2", {"n_embd": 128, "n_layer": 2, "n_head": 2, "vocab_size": 8192}),
    "gpt2-10m": ("gpt2", {"n_embd": 256, "n_layer": 8, "n_head": 4, "vocab_size": 16384}),
    "llama-tiny": ("llama", {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
                             "num_attention_heads": 4, "num_key_value_heads": 4,
                             "vocab_size": 256, "tie_word_embeddings": False}),
    "gpt2-124m": ("gpt2", {}),  # GPT-2 small's shapes (768 wide, 3072 in the MLP, 12 layers)
    "minilm": ("bert", {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                        "intermediate_size": 1536, "vocab_size": 30522}),
}


def build(name: str, seq: int) -> torch.nn.Module:
    """A randomly initialised model of the named size (no download)."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    family, kw = MODELS[name]
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_positions=seq, **kw))
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(max_position_embeddings=seq, **kw))
    return BertForMaskedLM(BertConfig(max_position_embeddings=max(seq, 512), **kw))


def make_optimizer(kind: str, model: torch.nn.Module, slnb_args: dict[str, Any]) -> Any:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    from hf_slnb import SLNB

    return SLNB(model.parameters(), model=model, **slnb_args)


def comm_floats(name: str, batch: int, seq: int, slnb_args: dict[str, Any]) -> tuple[int, int]:
    """Floats SLNB all-reduces per step in data parallel, and floats of the gradient all-reduce."""
    from hf_slnb.layers import ConvNeuron
    from hf_slnb.layers.base import gram_upper_blocks

    model = build(name, seq)
    opt = make_optimizer("slnb", model, slnb_args)
    data = torch.randint(0, model.config.vocab_size, (batch, seq))
    model(input_ids=data, labels=data).loss.backward()
    diagonal_only = opt.config.diagonal_only
    extra = 0
    for n in opt.neurons:
        if n.capture is None:
            continue
        extra += 2 * n.num_features + 2  # the bank rows (sums of x and x^2) and the counts
        if n.needs_moments and n.supports_explicit:  # what a data-parallel run sums: the gram
            d = n.num_features
            extra += sum(t.numel() for t in gram_upper_blocks(torch.empty(d, d)))
        if isinstance(n, ConvNeuron) and not diagonal_only:  # products reduced per PCG iteration
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
        for k, model in models.items():
            t = one_step(model, opts[k], data)
            if i >= 2:  # two warm-up steps
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def package_at(checkout: str) -> Any:
    """The ``hf_slnb`` package of another checkout (``CHECKOUT/hf_slnb``), imported under a
    name of its own, so that one process can time two versions side by side."""
    import hashlib
    import importlib.util

    root = os.path.join(os.path.abspath(checkout), "hf_slnb")
    if not os.path.isfile(os.path.join(root, "__init__.py")):
        raise ValueError(f"slnb@{checkout!r}: no hf_slnb package at {root!r}.")
    name = "hf_slnb_" + hashlib.sha1(root.encode()).hexdigest()[:8]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def make_spec_optimizer(spec: str, model: torch.nn.Module) -> Any:
    """``adamw`` (torch's default implementation: a loop over the tensors on the CPU),
    ``adamw_fused`` (``fused=True``: the Trainer's default, ``adamw_torch_fused``),
    ``torch_muon`` (Muon on the blocks' 2-D weights, AdamW on the rest),
    ``slnb:KEY=VALUE,...`` or ``slnb@CHECKOUT:KEY=VALUE,...`` (the ``hf_slnb`` of another
    checkout, say an older commit's ``git worktree``: :func:`package_at`)."""
    if spec == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if spec == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    if spec == "torch_muon":
        import benchmark  # the benchmark's own pairing, so the two scripts time the same thing

        prefix = {"gpt2": "transformer.h.", "llama": "model.layers."}.get(
            model.config.model_type, "bert.encoder.")
        return benchmark.torch_muon_optimizer(model, 1e-3, 0.01, prefix)
    if spec == "slnb" or spec.startswith("slnb:"):
        return make_optimizer("slnb", model, parse_kv(spec.partition(":")[2]))
    if spec.startswith("slnb@"):
        checkout, _, options = spec[len("slnb@"):].partition(":")
        return package_at(checkout).SLNB(model.parameters(), model=model, **parse_kv(options))
    raise ValueError(f"Invalid --side-by-side entry {spec!r}: 'adamw', 'adamw_fused', "
                     "'torch_muon', 'slnb[:KEY=VALUE,...]' or 'slnb@CHECKOUT[:KEY=VALUE,...]'.")


def side_by_side(names: list[str], specs: list[str], steps: int, batch: int, seq: int) -> None:
    """Step time of every spec, interleaved step by step in one process, per model: the median
    forward + backward (the median drops the shared machine's stalls, which a mean over a few
    multi-second steps does not: one MiniLM run's forward and backward took 4.5 to 5.7 s from
    step to step; where an SLNB spec captures its inputs in one step of ``cov_every``, the
    median of each phase of that period, averaged over the phases) plus the mean
    ``optimizer.step()`` (so that periodic work, such as an inverse root every 10 steps, counts
    at its share)."""
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {batch}x{seq}, "
          f"{steps} steps after 2 warm-up steps, interleaved: median forward+backward + mean "
          "step()")
    print("| model | " + " | ".join(f"{s} (s)" for s in specs) + " | " +
          " | ".join(f"{s} / {specs[0]}" for s in specs[1:]) + " |")
    print("|---" * (2 * len(specs)) + "|")
    for name in names:
        models = [build(name, seq) for _ in specs]
        opts = [make_spec_optimizer(s, m) for s, m in zip(specs, models)]
        data = torch.randint(0, models[0].config.vocab_size, (batch, seq))
        times: list[tuple[list[float], list[float]]] = [([], []) for _ in specs]
        for i in range(steps + 2):
            for k, (model, opt) in enumerate(zip(models, opts)):
                t0 = time.perf_counter()
                model(input_ids=data, labels=data).loss.backward()
                t1 = time.perf_counter()
                opt.step()
                model.zero_grad(set_to_none=True)
                if i >= 2:
                    times[k][0].append(t1 - t0)
                    times[k][1].append(time.perf_counter() - t1)
        # SLNB with cov_every=k captures in one step of k: the median of each phase of the
        # steps (their index modulo the specs' common period), averaged over the phases.
        period = math.lcm(*(getattr(getattr(o, "config", None), "cov_every", 1) for o in opts))
        parts = [(statistics.fmean(statistics.median(fb[r::period]) for r in range(period)),
                  statistics.fmean(st)) for fb, st in times]
        total = [fb + st for fb, st in parts]
        print(f"| {name} | " + " | ".join(f"{t:.3f}" for t in total) + " | " +
              " | ".join(f"{t / total[0]:.2f}" for t in total[1:]) + " |", flush=True)
        print(f"  {name}: forward+backward median / step() mean (s): " + "; ".join(
            f"{s} {fb:.3f} / {st:.3f}" for s, (fb, st) in zip(specs, parts)), flush=True)


def held_bytes(opt: Any, scratch: bool = True) -> int:
    """Bytes of every distinct storage an optimizer holds between steps (the model's parameters
    aside): its state, and for SLNB its arenas and its banks' tensors (covariances, roots, the
    step's ``x xᵀ`` sums, the cached ``C⁻¹``). Without ``scratch``, SLNB's step scratch (each
    arena's gradient copy and update, which it frees between steps on accelerators and keeps
    on the CPU) is left out: what it holds there."""
    seen = {p.untyped_storage().data_ptr() for g in opt.param_groups for p in g["params"]}
    if not scratch:
        seen |= {t.untyped_storage().data_ptr() for a in getattr(opt, "_arenas", None) or []
                 for t in (a.grad, a.update)}
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, dict):
            t = list(t.values())
        if isinstance(t, (list, tuple)):
            for item in t:
                add(item)
        elif isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    for st in opt.state.values():
        add(st)
    for arena in getattr(opt, "_arenas", None) or []:
        add(arena.__dict__)
    for bank in getattr(opt, "banks", []):
        add(bank.__dict__)
    return total


def held_memory(names: list[str], specs: list[str], batch: int, seq: int,
                scratch: bool = True) -> None:
    """Memory each optimizer holds after two steps (:func:`held_bytes`), per model."""
    print(f"torch {torch.__version__}, batch {batch}x{seq}, after 2 steps: MiB the optimizer holds"
          + ("" if scratch else " (SLNB's step scratch left out, as accelerators free it)"))
    print("| model | params | " + " | ".join(specs) + " |")
    print("|---" * (len(specs) + 2) + "|")
    for name in names:
        row = []
        for spec in specs:
            torch.manual_seed(0)
            model = build(name, seq)
            opt = make_spec_optimizer(spec, model)
            data = torch.randint(0, model.config.vocab_size, (batch, seq))
            for _ in range(2):
                one_step(model, opt, data)
            row.append(held_bytes(opt, scratch) / 2**20)
            n_params = sum(p.numel() for p in model.parameters())
            del model, opt
        print(f"| {name} | {n_params / 1e6:.1f}M | " + " | ".join(f"{v:.1f}" for v in row) + " |",
              flush=True)


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


# -- op and host-sync counting (--count-ops) ------------------------------------------------------
#: Ops that make the host wait for the device on CUDA, by aten name, with the kind reported.
#: ``_local_scalar_dense`` is ``.item()``, ``bool()``, ``float()``, ``int()`` and ``if tensor:``;
#: ``lift_fresh`` is ``torch.tensor(python_data)``: on CUDA an H2D copy from pageable memory that
#: blocks (an upper bound: a tensor built on the CPU on purpose shows up here too).
SYNC_KINDS = {
    "_local_scalar_dense": "item", "is_nonzero": "item", "equal": "item",
    "nonzero": "nonzero", "bincount": "bincount", "masked_select": "masked_select",
    "_unique": "unique", "_unique2": "unique", "unique_dim": "unique",
    "unique_consecutive": "unique", "unique_dim_consecutive": "unique",
    "lift_fresh": "from_python", "lift_fresh_copy": "from_python",
}
SYNC_COLUMNS = ("item", "from_python", "bincount", "nonzero", "unique", "masked_select",
                "repeat_interleave", "bool_index")
#: State keys that torch.optim and SLNB keep on the host (``step`` is a CPU tensor unless
#: ``capturable``/``fused``): reading one on CUDA is not a device sync, so it is counted apart.
HOST_STATE_KEYS = ("step", "stat_step")
COUNT_MODELS = ("gpt2-12l", "llama-12l")
COUNT_OPTIMIZERS = ("adamw", "slnb", "slnb-paper")


def sync_kind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The kind of device->host sync an aten op forces on CUDA, or ``None``."""
    name = func.overloadpacket.__name__
    if name in SYNC_KINDS:
        return SYNC_KINDS[name]
    if name == "repeat_interleave":  # the output size is data dependent unless given
        given = kwargs.get("output_size", args[-1] if len(args) > 2 else None)
        return None if given is not None else "repeat_interleave"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # x[mask]: a nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices or ()):
            return "bool_index"
    return None


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this script (a sync's site)."""
    import traceback

    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == here or f"{os.sep}torch{os.sep}" in path:
            continue
        parts = path.split(os.sep)
        return f"{os.sep.join(parts[-2:])}:{frame.lineno}"
    return "?"


def _ptr(t: torch.Tensor) -> int:
    """The tensor's data pointer (0 where it has none: meta, sparse, nested)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return 0


class _Origin:
    """A tensor built from Python data whose device is not known yet (see :class:`OpCounter`)."""

    def __init__(self, phase: str, site: str) -> None:
        self.phase, self.site, self.state = phase, site, "pending"


class OpCounter(TorchDispatchMode):
    """Count the aten ops dispatched while active, by phase, and the host syncs among them.

    Every op that reaches the dispatcher below autograd counts once (a ``_foreach_*`` op counts
    once for its whole list): on CUDA each is about one kernel launch, views excepted. Syncs are
    counted per kind (see :data:`SYNC_KINDS`) with the source line that asked for them.

    On the CPU every tensor is a CPU tensor, so what would stay on the host in a CUDA run is
    tracked: the tensors in ``host`` (optimizer ``step`` counters) and whatever is computed from
    host tensors alone. Ops on them are ``host_ops`` and reading them is a ``host_read``, not a
    sync. A tensor built from Python data (``lift_fresh``) counts as a sync once it meets a device
    tensor or when the counter closes without having met a host one; used only with host
    tensors it is a host tensor itself (``torch.optim``'s ``torch.tensor(1.0, device="cpu")``
    step increment). An empty one copies nothing and never syncs.

    Args:
        host: Tensors that live on the host even in a CUDA run.
    """

    def __init__(self, host: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.phase = "other"
        self._host: dict[int, torch.Tensor] = {t.data_ptr(): t for t in host or ()}
        self._pending: dict[int, tuple[torch.Tensor, _Origin]] = {}
        self.ops: dict[str, Counter[str]] = defaultdict(Counter)
        self.host_ops: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()
        self.syncs: dict[str, Counter[str]] = defaultdict(Counter)
        self.sites: dict[str, Counter[str]] = defaultdict(Counter)

    def _sync(self, phase: str, kind: str, site: str) -> None:
        self.syncs[phase][kind] += 1
        self.sites[phase][f"{kind} {site}"] += 1

    def _confirm(self, origin: _Origin, as_sync: bool) -> None:
        if origin.state == "pending":
            origin.state = "sync" if as_sync else "host"
            if as_sync:
                self._sync(origin.phase, "from_python", origin.site)
            else:  # its lift_fresh was a host op too
                self.host_ops[origin.phase] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.ops[self.phase][str(func)] += 1
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        if func.namespace != "aten":  # profiler markers and the like
            return out
        name = func.overloadpacket.__name__
        if name in ("lift_fresh", "lift_fresh_copy"):
            if isinstance(out, torch.Tensor) and out.numel() > 0 and _ptr(out):
                self._pending[_ptr(out)] = (out, _Origin(self.phase, _caller()))
            return out
        host, origins, device = False, [], False
        for t in tensors:
            ptr = _ptr(t)
            if ptr and ptr in self._host and self._host[ptr].numel() == t.numel():
                host = True
            elif ptr and ptr in self._pending:
                origins.append(self._pending[ptr][1])
            else:
                device = True
        if device or not tensors:
            for origin in origins:
                self._confirm(origin, as_sync=True)
            kind = sync_kind(func, args, kwargs)
            if kind is not None:
                self._sync(self.phase, kind, _caller())
            return out
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if host:  # host tensors only: a host op, whose results stay on the host
            for origin in origins:
                self._confirm(origin, as_sync=False)
            self.host_ops[self.phase] += 1
            if name in SYNC_KINDS or sync_kind(func, args, kwargs) is not None:
                self.host_reads[self.phase] += 1
            for t in outs:
                if _ptr(t):
                    self._host[_ptr(t)] = t
        else:  # built from Python data only: still undecided
            for t in outs:
                if _ptr(t):
                    self._pending[_ptr(t)] = (t, origins[0])
        return out

    def __exit__(self, *exc: object) -> Any:
        for _, origin in self._pending.values():
            self._confirm(origin, as_sync=True)  # never met a host tensor: assume a device one
        self._pending.clear()
        return super().__exit__(*exc)

    def total(self, phase: str) -> int:
        return sum(self.ops[phase].values())

    def device_ops(self, phase: str) -> int:
        """Ops of ``phase`` that run on the device in a CUDA run (host ops, markers excluded)."""
        markers = sum(v for k, v in self.ops[phase].items() if not k.startswith("aten."))
        return self.total(phase) - self.host_ops[phase] - markers

    def views(self, phase: str) -> int:
        """Ops of ``phase`` that are views or aliases (host ops included)."""
        return sum(v for k, v in self.ops[phase].items() if _is_view(k))


def _is_view(op: str) -> bool:
    """Whether an aten op name (``aten.view.default``) is a view (no kernel on the device)."""
    packet = getattr(torch.ops.aten, op.split(".")[1], None)
    overload = getattr(packet, op.split(".")[2], None) if packet is not None else None
    return bool(getattr(overload, "is_view", False))


def count_ops_in(fn: Any, *args: Any, host: list[torch.Tensor] | None = None) -> OpCounter:
    """Run ``fn(*args)`` under an :class:`OpCounter` (phase ``"other"``) and return it."""
    with OpCounter(host) as counter:
        fn(*args)
    return counter


def build_count_model(name: str, seq: int, vocab: int) -> torch.nn.Module:
    """The issue-10 12-layer models: tiny GPT-2 (148 tensors) and tiny Llama (111, untied)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2-12l":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=12, n_head=2, vocab_size=vocab,
                                          n_positions=seq))
    if name == "llama-12l":
        return LlamaForCausalLM(LlamaConfig(
            hidden_size=64, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, vocab_size=vocab, max_position_embeddings=seq,
            tie_word_embeddings=False))
    if name == "gpt2-2l":  # the test's model
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab,
                                          n_positions=seq))
    raise ValueError(f"Invalid count model {name!r}: must be one of {COUNT_MODELS + ('gpt2-2l',)}.")


def make_count_optimizer(kind: str, model: torch.nn.Module, slnb_args: dict[str, Any]) -> Any:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    from hf_slnb import SLNB

    if kind == "slnb":
        return SLNB(model.parameters(), model=model, **slnb_args)
    if kind == "slnb-paper":
        return SLNB(model.parameters(), model=model, **{"preset": "paper", **slnb_args})
    raise ValueError(f"Invalid optimizer {kind!r}: must be one of {COUNT_OPTIMIZERS}.")


def _host_counters(opt: Any) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for k, v in state.items()
            if k in HOST_STATE_KEYS and isinstance(v, torch.Tensor) and v.numel() == 1]


def count_step(name: str, kind: str, *, batch: int, seq: int, vocab: int, micro: int,
               warmup: int, slnb_args: dict[str, Any]) -> dict[str, Any]:
    """Ops and syncs of one steady-state training step (after ``warmup`` steps), by phase.

    Phases: ``forward_1``/``backward_1`` (first micro-batch of the step), ``forward``/
    ``backward`` (the later ones, summed) and ``step`` (``optimizer.step()``).
    """
    from hf_slnb.functional import accelerator_paths

    model = build_count_model(name, seq, vocab).train()
    opt = make_count_optimizer(kind, model, slnb_args)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(micro)]

    def train_step(counter: OpCounter | None) -> None:
        for i, x in enumerate(data):
            suffix = "_1" if i == 0 else ""
            if counter is not None:
                counter.phase = "forward" + suffix
            loss = model(input_ids=x, labels=x).loss / micro
            if counter is not None:
                counter.phase = "backward" + suffix
            loss.backward()
        if counter is not None:
            counter.phase = "step"
        opt.step()
        if counter is not None:
            counter.phase = "other"
        opt.zero_grad(set_to_none=True)

    with accelerator_paths():  # count what an accelerator's step dispatches
        for _ in range(warmup):
            train_step(None)
        with OpCounter(_host_counters(opt)) as counter:
            train_step(counter)
    n_tensors = sum(1 for g in opt.param_groups for p in g["params"] if p.requires_grad)
    phases = ("forward_1", "backward_1", "forward", "backward", "step")
    return {
        "model": name, "optimizer": kind, "tensors": n_tensors,
        "hooked_layers": len(getattr(opt, "neurons", ())),
        "micro_batches": micro,
        "ops": {ph: counter.device_ops(ph) for ph in phases},
        "views": {ph: counter.views(ph) for ph in phases},
        "host_ops": {ph: counter.host_ops[ph] for ph in phases},
        "host_reads": {ph: counter.host_reads[ph] for ph in phases},
        "syncs": {ph: dict(counter.syncs[ph]) for ph in phases},
        "sync_sites": {ph: dict(counter.sites[ph].most_common()) for ph in phases},
        "op_counts": {ph: dict(counter.ops[ph].most_common()) for ph in phases},
    }


def _sync_cell(syncs: dict[str, int]) -> str:
    total = sum(syncs.values())
    if not total:
        return "0"
    kinds = ", ".join(f"{k} {syncs[k]}" for k in SYNC_COLUMNS if syncs.get(k))
    return f"{total} ({kinds})"


def hook_ops(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Extra device ops per hooked layer and micro-batch of ``row`` over ``base`` (same model).

    ``first``: the step's first micro-batch (captures are created there); ``later``: each
    further one; ``by_op``: the extra op counts of the first micro-batch, by aten op.
    """
    layers = max(row["hooked_layers"], 1)
    first = sum(row["ops"][p] - base["ops"][p] for p in ("forward_1", "backward_1")) / layers
    later = None
    if row["micro_batches"] > 1:
        extra = sum(row["ops"][p] - base["ops"][p] for p in ("forward", "backward"))
        later = extra / layers / (row["micro_batches"] - 1)
    by_op: Counter[str] = Counter()
    for p in ("forward_1", "backward_1"):
        by_op.update(row["op_counts"][p])
        by_op.subtract(base["op_counts"][p])
    return {"first": first, "later": later,
            "by_op": {k: v for k, v in by_op.most_common() if v and k.startswith("aten.")}}


def count_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`count_step` results (hooks measured against AdamW's model)."""
    base = {r["model"]: r for r in rows if r["optimizer"] == "adamw"}
    out = [("| model | tensors / hooked layers | optimizer | step device ops (views) |"
           " ops / tensor | hook ops / layer / micro-batch (first, later) | syncs forward |"
           " syncs backward | syncs step | step host-counter ops |"),
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = "-"
        b = base.get(r["model"])
        if b is not None and r["hooked_layers"] and r is not b:
            h = r["hook_ops"] = hook_ops(r, b)
            cell = f"{h['first']:.1f}" + ("" if h["later"] is None else f", {h['later']:.1f}")
        fwd = Counter(r["syncs"]["forward_1"]) + Counter(r["syncs"]["forward"])
        bwd = Counter(r["syncs"]["backward_1"]) + Counter(r["syncs"]["backward"])
        step = r["ops"]["step"]
        out.append(
            f"| {r['model']} | {r['tensors']} / {r['hooked_layers'] or '-'} | {r['optimizer']} |"
            f" {step:,} ({r['views']['step']:,}) | {step / r['tensors']:.1f} | {cell} |"
            f" {_sync_cell(dict(fwd))} | {_sync_cell(dict(bwd))} |"
            f" {_sync_cell(r['syncs']['step'])} | {r['host_ops']['step']} |")
    return "\n".join(out)


def count_main(args: argparse.Namespace, slnb_args: dict[str, Any]) -> list[dict[str, Any]]:
    """``--count-ops``: the table for every model x optimizer, the JSON to ``--out``."""
    models = args.models.split(",") if args.models else list(COUNT_MODELS)
    kinds = args.optimizers.split(",")
    known = (*COUNT_MODELS, "gpt2-2l")
    for name in models:  # refuse bad input before any counting
        if name not in known:
            raise ValueError(f"Invalid --models entry {name!r}: with --count-ops, one of {known}.")
    for kind in kinds:
        if kind not in COUNT_OPTIMIZERS:
            raise ValueError(f"Invalid --optimizers entry {kind!r}: one of {COUNT_OPTIMIZERS}.")
    if args.micro_batches < 1 or args.warmup < 0:
        raise ValueError(f"Invalid --micro-batches={args.micro_batches} / --warmup={args.warmup}: "
                         "must be >= 1 / >= 0.")
    rows = []
    for name in models:
        for kind in kinds:
            rows.append(count_step(name, kind, batch=args.batch, seq=args.seq,
                                   vocab=args.vocab, micro=args.micro_batches,
                                   warmup=args.warmup, slnb_args=slnb_args))
            print(f"counted {name} / {kind}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {args.micro_batches} micro-batches of {args.batch}x"
          f"{args.seq} per step, vocab {args.vocab}, counted after {args.warmup} warm-up steps, "
          f"slnb {slnb_args or 'defaults'}\n")
    print(count_table(rows))
    for r in rows:
        top = Counter({k: v for k, v in r["op_counts"]["step"].items() if k.startswith("aten.")})
        print(f"\n{r['model']} / {r['optimizer']}: top step ops: "
              + ", ".join(f"{k[5:]} {v}" for k, v in top.most_common(10)))
        if "hook_ops" in r:
            print("  extra ops in the first micro-batch, all layers: " + ", ".join(
                f"{k[5:]} {v}" for k, v in list(r["hook_ops"]["by_op"].items())[:10]))
        sites: Counter[str] = Counter()
        for ph in r["sync_sites"].values():
            sites.update(ph)
        if sites:
            print("  sync sites (all phases): "
                  + "; ".join(f"{k} x{v}" for k, v in sites.most_common(8)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "batch": args.batch, "seq": args.seq,
                       "vocab": args.vocab, "micro_batches": args.micro_batches,
                       "warmup": args.warmup, "slnb_args": slnb_args, "rows": rows}, f, indent=1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma separated; default gpt2-tiny,gpt2-10m,minilm (with "
                        "--count-ops: gpt2-12l,llama-12l)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--slnb-args", default="", help='e.g. "cg_iters=1,diagonal_only=True"')
    parser.add_argument("--profile", default=None, help="profile one SLNB step of this model")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--count-ops", action="store_true",
                        help="count aten ops and host syncs per step instead of timing")
    parser.add_argument("--optimizers", default=",".join(COUNT_OPTIMIZERS),
                        help="with --count-ops: comma separated, from " + ",".join(COUNT_OPTIMIZERS))
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="with --count-ops: micro-batches accumulated per step")
    parser.add_argument("--warmup", type=int, default=4,
                        help="with --count-ops: warm-up steps (4: the counted step is the fifth, "
                        "one in which the whitened preset, cov_every=4, reads the inputs)")
    parser.add_argument("--vocab", type=int, default=512, help="with --count-ops: vocabulary size")
    parser.add_argument("--out", default=None, help="with --count-ops: write the counts as JSON")
    parser.add_argument("--side-by-side", default=None, metavar="SPEC;SPEC;...",
                        help="time these optimizers interleaved (the first is the baseline): "
                        "'adamw', 'adamw_fused' (fused=True: the Trainer's default), "
                        "'torch_muon', 'slnb[:KEY=VALUE,...]', 'slnb@CHECKOUT[:KEY=VALUE,...]' "
                        "(another checkout's hf_slnb, e.g. an older commit's git worktree), "
                        "separated by ';'")
    parser.add_argument("--held-memory", default=None, metavar="SPEC;SPEC;...",
                        help="print the memory each optimizer holds after two steps (its state "
                        "and buffers), specs as for --side-by-side")
    parser.add_argument("--without-scratch", action="store_true",
                        help="with --held-memory: leave out SLNB's step scratch (the gradients' "
                        "copy and the update), which it frees between steps on accelerators")
    parser.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "OPT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    slnb_args = parse_kv(args.slnb_args)
    if args.count_ops:
        count_main(args, slnb_args)
        return
    args.models = args.models or "gpt2-tiny,gpt2-10m,minilm"
    if args.memory_worker:
        memory_worker(*args.memory_worker, 3, args.batch, args.seq, slnb_args)
        return
    if args.held_memory:
        held_memory(args.models.split(","), args.held_memory.split(";"), args.batch, args.seq,
                    not args.without_scratch)
        return
    if args.side_by_side:
        side_by_side(args.models.split(","), args.side_by_side.split(";"), args.steps,
                     args.batch, args.seq)
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
