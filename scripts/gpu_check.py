"""GPU readiness check (issue 10, item 4): CUDA tests, a sync-free hot path, 124M GPT-2 vs fused AdamW.

Three parts, each time-boxed and caught, so one failure never hides the others:

1. ``pytest`` on the tests that apply to CUDA (``tests/test_cuda.py``: the paper preset on the
   device against the dense float64 reference, both presets against the CPU, float32 state for
   bf16 parameters) and the op counter's own tests.
2. For SLNB's ``graft``, ``paper`` and ``whitened`` presets on a small GPT-2, after warm-up steps: forward,
   backward and ``step()`` each under ``torch.cuda.set_sync_debug_mode("error")``; then the same
   under ``"warn"``, to count the syncs of each phase and name the lines that caused them.
3. A ~124M GPT-2 (n_embd 768, 12 layers, 12 heads, vocab 50257) trained in bf16 autocast with
   SLNB ``preset="graft"``, SLNB ``preset="whitened"`` (the default for a transformer) and ``torch.optim.AdamW(fused=True)``, same
   initialisation and data, steps interleaved (the order reverses every step); median step
   time (forward + backward + step) ratios to AdamW, peak memory ratios (each model alone,
   ``torch.cuda.max_memory_allocated`` reset in between) and the loss after N steps.

It prints one markdown summary and writes it as JSON to ``$OUT/gpu_check.json`` when ``OUT`` is
set (and to ``--json``). Depends only on torch, transformers and hf_slnb. About 1-2 minutes on an
H100/H200 at the defaults; ``--budget`` caps the whole run.

Usage:
    python scripts/gpu_check.py                  # on a CUDA machine
    python scripts/gpu_check.py --steps 50 --batch 16
    python scripts/gpu_check.py --dry-run        # CPU, tiny sizes, seconds: every code path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
#: Tests that apply to CUDA (part 1).
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_count_ops.py")
#: Part 2: SLNB's presets, and fused AdamW on the same model (the model's own syncs, if any).
SYNC_CASES = ("graft", "paper", "whitened", "adamw")
#: Part 3: the optimizers trained side by side (SLNB's ``graft`` preset, its ``whitened`` preset,
#: the default for a transformer, and fused AdamW) and how the summary names them.
TRAIN_KINDS = {"slnb": "SLNB preset='graft'", "whitened": "SLNB preset='whitened'",
               "adamw": "AdamW(fused=True)"}
PHASES = ("forward", "backward", "step")
#: Dropout off: both optimizers then see exactly the same function (equal first losses).
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
#: What the CPU stand-in of the sync debug mode (``--dry-run``) refuses: the ops that sync on CUDA.
CPU_SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "bincount", "_unique2",
                "masked_select", "lift_fresh")


class Deadline:
    """The time left to the whole check, and to each part within it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _error(err: BaseException) -> dict[str, str]:
    """An exception as a short record: type, first line, innermost frame in hf_slnb if any."""
    frames = traceback.extract_tb(err.__traceback__)
    site = next((f for f in reversed(frames) if f"{os.sep}hf_slnb{os.sep}" in f.filename), None)
    site = site or (frames[-1] if frames else None)
    where = f"{Path(site.filename).name}:{site.lineno} ({site.line})" if site else "?"
    return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}",
            "where": where}


# -- part 1: tests ---------------------------------------------------------------------------
def run_tests(tests: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """``pytest -q`` on ``tests`` in a subprocess; its summary line and the failed test ids."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {timeout:.0f} s", "failed": []}
    lines = proc.stdout.strip().splitlines()
    failed = [ln.split(" ", 2)[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return {"ok": proc.returncode == 0, "returncode": proc.returncode,
            "summary": lines[-1] if lines else proc.stderr.strip()[-300:],
            "failed": failed, "seconds": round(time.perf_counter() - t0, 1)}


# -- part 2: host syncs ----------------------------------------------------------------------
def _site() -> tuple[str, int]:
    """The innermost frame outside torch and this script: the line that asked for a sync."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != os.path.abspath(__file__) and f"{os.sep}torch{os.sep}" not in path:
            return frame.filename, frame.lineno or 0
    return "?", 0


class _CpuSyncGuard(TorchDispatchMode):
    """CPU stand-in for the sync debug mode: raises (``error``) or warns on a syncing op.

    Host-side counters (``host``: optimizer ``step`` tensors, on the CPU in a CUDA run too)
    are exempt, as they are on CUDA.
    """

    def __init__(self, mode: str, host: set[int]) -> None:
        super().__init__()
        self.mode, self.host = mode, host

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        first = args[0] if args else None
        exempt = isinstance(first, torch.Tensor) and (
            first.data_ptr() in self.host or first.numel() == 0)  # an empty copy copies nothing
        if name in CPU_SYNC_OPS and not exempt:
            message = f"called a synchronizing operation ({func}) [CPU stand-in]"
            if self.mode == "error":
                raise RuntimeError(message)
            warnings.warn_explicit(message, UserWarning, *_site())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def sync_debug(mode: str, device: torch.device, host: set[int]) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block (a dispatch-mode stand-in on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()  # what was queued before the block is not the block's
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:  # the accelerator's path: without the CPU's own (hf_slnb.functional.CPU_PATHS)
        from hf_slnb.functional import accelerator_paths

        with accelerator_paths(), _CpuSyncGuard(mode, host):
            yield


def _host_counters(opt: torch.optim.Optimizer) -> set[int]:
    return {v.data_ptr() for st in opt.state.values() for k, v in st.items()
            if k in ("step", "stat_step") and isinstance(v, torch.Tensor) and v.device.type == "cpu"}


def _small_gpt2(device: torch.device, dry: bool) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64 if dry else 256, n_layer=2 if dry else 4, n_head=2 if dry else 4,
                     vocab_size=256 if dry else 4096, n_positions=128, **NO_DROPOUT)
    return GPT2LMHeadModel(cfg).to(device).train()


def _phase_fns(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor
               ) -> dict[str, Callable[[], None]]:
    """The three phases of one training step, as closures sharing the loss."""
    held: dict[str, torch.Tensor] = {}

    def forward() -> None:
        held["loss"] = model(input_ids=ids, labels=ids).loss

    def backward() -> None:
        held.pop("loss").backward()

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"forward": forward, "backward": backward, "step": step}


def check_syncs(case: str, device: torch.device, dry: bool, deadline: Deadline,
                warmup: int = 3) -> dict[str, Any]:
    """Each phase under the ``error`` sync mode (fresh model per phase), then counts under ``warn``.

    ``case``: an SLNB preset, or ``"adamw"`` for ``torch.optim.AdamW(fused=True)``.
    """
    out: dict[str, Any] = {"case": case, "error_mode": {}, "warn_counts": {}, "sites": {}}
    gen = torch.Generator().manual_seed(0)

    def fresh() -> tuple[Any, dict[str, Callable[[], None]]]:
        model = _small_gpt2(device, dry)
        if case == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        else:
            from hf_slnb import SLNB

            opt = SLNB(model.parameters(), model=model, preset=case)
        ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=gen).to(device)
        fns = _phase_fns(model, opt, ids)
        for _ in range(warmup):  # steady state: lazily created state exists
            for ph in PHASES:
                fns[ph]()
        return opt, fns

    for phase in PHASES:
        if deadline.left() < 5:
            out["error_mode"][phase] = {"ok": None, "error": "skipped: out of time"}
            continue
        opt, fns = fresh()
        for ph in PHASES:
            if ph != phase:
                fns[ph]()
                continue
            try:
                with sync_debug("error", device, _host_counters(opt)):
                    fns[ph]()  # the check is on the host: a sync raises where it is asked for
                out["error_mode"][phase] = {"ok": True}
            except Exception as err:  # noqa: BLE001 - reported; the next phase starts afresh
                out["error_mode"][phase] = {"ok": False, **_error(err)}
                break
    if deadline.left() > 5:
        opt, fns = fresh()
        for ph in PHASES:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with sync_debug("warn", device, _host_counters(opt)):
                    fns[ph]()
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            out["warn_counts"][ph] = len(syncs)
            out["sites"][ph] = dict(Counter(f"{Path(w.filename).name}:{w.lineno}"
                                            for w in syncs).most_common(6))
    return out


# -- part 3: 124M GPT-2, SLNB against fused AdamW ----------------------------------------------
def _gpt2(device: torch.device, dry: bool, seq: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if dry:
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=256, n_positions=seq,
                         **NO_DROPOUT)
    else:  # GPT-2 small: 124M parameters
        cfg = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=seq,
                         **NO_DROPOUT)
    return GPT2LMHeadModel(cfg).to(device).train()


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind in ("slnb", "whitened"):
        from hf_slnb import SLNB

        return SLNB(model.parameters(), model=model,
                    preset="whitened" if kind == "whitened" else "graft")
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor,
                device: torch.device) -> tuple[float, torch.Tensor]:
    """One bf16-autocast step; its wall time (device work included) and the loss."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t0, loss.detach()


def _data(vocab: int, batch: int, seq: int, device: torch.device, n: int = 4) -> list[torch.Tensor]:
    """A few fixed batches, cycled: both optimizers see the same tokens in the same order."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(n)]


def peak_memory(kind: str, device: torch.device, dry: bool, batch: int, seq: int,
                steps: int = 3) -> float | None:
    """Peak allocated memory (GiB) of training one model alone (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    model = _gpt2(device, dry, seq)
    opt = _optimizer(kind, model)
    data = _data(model.config.vocab_size, batch, seq, device)
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps):  # the first step creates the state; the peak includes it
        _train_step(model, opt, data[i % len(data)], device)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, data
    torch.cuda.empty_cache()
    return peak


def compare_training(device: torch.device, dry: bool, batch: int, seq: int, steps: int,
                     warmup: int, deadline: Deadline) -> dict[str, Any]:
    """SLNB's presets against fused AdamW, interleaved steps; times, losses and peak memory."""
    out: dict[str, Any] = {"batch": batch, "seq": seq, "steps_asked": steps}
    kinds = tuple(TRAIN_KINDS)
    out["peak_gib"] = {}
    for kind in kinds:
        try:
            out["peak_gib"][kind] = peak_memory(kind, device, dry, batch, seq)
        except Exception as err:  # noqa: BLE001 - reported; the other parts run
            out["peak_gib"][kind] = None
            out.setdefault("errors", {})[f"memory/{kind}"] = _error(err)
    models = {k: _gpt2(device, dry, seq) for k in kinds}
    out["params_m"] = sum(p.numel() for p in models["slnb"].parameters()) / 1e6
    opts = {k: _optimizer(k, m) for k, m in models.items()}
    data = _data(models["slnb"].config.vocab_size, batch, seq, device)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    losses: dict[str, list[float]] = {k: [] for k in kinds}
    failed: dict[str, dict[str, str]] = {}
    for i in range(warmup + steps):
        if i >= warmup and deadline.left() < 10:
            out["stopped_early"] = f"after {i - warmup} timed steps: out of time"
            break
        order = kinds if i % 2 == 0 else kinds[::-1]
        for k in order:
            if k in failed:
                continue
            try:
                t, loss = _train_step(models[k], opts[k], data[i % len(data)], device)
            except Exception as err:  # noqa: BLE001 - reported; the other optimizer goes on
                failed[k] = _error(err)
                continue
            losses[k].append(float(loss))  # after the timed region: this read is not timed
            if i >= warmup:
                times[k].append(t)
    if failed:
        out.setdefault("errors", {}).update({f"train/{k}": v for k, v in failed.items()})
    out["median_step_s"] = {k: statistics.median(v) if v else None for k, v in times.items()}
    out["timed_steps"] = {k: len(v) for k, v in times.items()}
    out["first_loss"] = {k: v[0] if v else None for k, v in losses.items()}
    out["final_loss"] = {k: v[-1] if v else None for k, v in losses.items()}
    t, m = out["median_step_s"], out["peak_gib"]
    for k, suffix in (("slnb", ""), ("whitened", "_whitened")):
        out["time_ratio" + suffix] = t[k] / t["adamw"] if t[k] and t["adamw"] else None
        out["memory_ratio" + suffix] = m[k] / m["adamw"] if m[k] and m["adamw"] else None
    return out


# -- report --------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _case_name(case: str) -> str:
    return "AdamW(fused=True)" if case == "adamw" else f"SLNB preset={case!r}"


def summary(report: dict[str, Any]) -> str:
    """The markdown summary of a report."""
    lines = [(f"## gpu_check ({report['device']}, torch {report['torch']}, "
             f"{report['seconds']:.0f} s{', dry run' if report['dry_run'] else ''})"), ""]
    tests = report.get("tests", {})
    lines.append(f"**1. tests** ({' '.join(report['tests_run'])}): {tests.get('summary', '-')}"
                 + (f"; failed: {', '.join(tests['failed'])}" if tests.get("failed") else ""))
    if "error" in tests:
        lines.append(f"  error: {tests['error']} at {tests.get('where')}")
    lines += ["", "**2. host syncs** (error mode per phase; syncs counted in warn mode)", "",
              "| optimizer | forward | backward | step | syncs fwd / bwd / step | first sites |",
              "|---|---|---|---|---|---|"]
    for s in report.get("syncs", []):
        if "error" in s and "error_mode" not in s:
            lines.append(f"| {_case_name(s['case'])} | failed: {s['error']} at {s['where']} |"
                         " | | | |")
            continue
        cells = []
        for ph in PHASES:
            r = s["error_mode"].get(ph, {})
            cells.append("ok" if r.get("ok") else f"FAIL {r.get('where', r.get('error', '-'))}"
                         if r.get("ok") is False else r.get("error", "-"))
        counts = " / ".join(str(s["warn_counts"].get(ph, "-")) for ph in PHASES)
        sites = "; ".join(f"{k} x{v}" for ph in PHASES for k, v in
                          list(s["sites"].get(ph, {}).items())[:2])
        lines.append(f"| {_case_name(s['case'])} | {' | '.join(cells)} | {counts} |"
                     f" {sites or '-'} |")
    tr = report.get("training", {})
    lines += ["", (f"**3. GPT-2 {_fmt(tr.get('params_m'), '.1f')}M, bf16 autocast, batch "
              f"{tr.get('batch')}x{tr.get('seq')}, {tr.get('timed_steps', {}).get('slnb', 0)} timed "
              "steps each (interleaved)**"), "",
              "| optimizer | median step (s) | peak memory (GiB) | loss first -> last |",
              "|---|---|---|---|"]
    if "error" in tr and "median_step_s" not in tr:
        lines.append(f"| failed: {tr['error']} at {tr['where']} | | | |")
    else:
        for k, name in TRAIN_KINDS.items():
            lines.append(f"| {name} | {_fmt(tr['median_step_s'][k], '.4f')} |"
                         f" {_fmt(tr['peak_gib'][k], '.2f')} | {_fmt(tr['first_loss'][k])} ->"
                         f" {_fmt(tr['final_loss'][k])} |")
        for label, suffix in (("SLNB / AdamW", ""), ("whitened / AdamW", "_whitened")):
            lines.append(f"| **{label}** | **{_fmt(tr.get('time_ratio' + suffix), '.2f')}** |"
                         f" **{_fmt(tr.get('memory_ratio' + suffix), '.2f')}** | |")
        for k, v in tr.get("errors", {}).items():
            lines.append(f"\n{k}: {v['error']} at {v['where']}")
        if tr.get("stopped_early"):
            lines.append(f"\nstopped early: {tr['stopped_early']}")
    lines.append("\nTargets: issue 10 (graft) time ratio <= 1.05, memory ratio <= 1.05, "
                 "0 syncs; issue 13 (whitened) time ratio <= 1.15, memory AdamW's plus the "
                 "per-layer statistics, 0 syncs.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny models, a few steps: exercises every part in seconds")
    parser.add_argument("--steps", type=int, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, help="untimed steps first")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--budget", type=float, help="seconds for the whole check")
    parser.add_argument("--tests", nargs="*", default=list(CUDA_TESTS),
                        help="test files or ids for part 1 (none: skip it)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "syncs", "training"])
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.set_defaults(steps=30, warmup=3, batch=8, seq=1024, budget=270.0)
    args = parser.parse_args(argv)
    if args.dry_run:  # tiny unless asked otherwise
        for key, value in (("steps", 3), ("warmup", 1), ("batch", 2), ("seq", 32), ("budget", 120.0)):
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    for key in ("steps", "warmup", "batch", "seq"):
        if getattr(args, key) < (1 if key != "warmup" else 0):
            raise ValueError(f"Invalid --{key}={getattr(args, key)}: must be >= 1 (warmup >= 0).")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run for the CPU code path check")
    device = torch.device("cpu" if args.dry_run else "cuda")
    deadline = Deadline(args.budget)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "dry_run": args.dry_run,
                              "args": vars(args), "tests_run": args.tests}
    if "tests" not in args.skip and args.tests:
        env = {"SLNB_TEST_DEVICE": "cpu"} if args.dry_run else {}
        # the tests get at most half of the budget: the other parts must still run
        report["tests"] = run_tests(args.tests, max(deadline.left() / 2, 10), env)
    print("tests done" if "tests" in report else "tests skipped", file=sys.stderr, flush=True)
    if "syncs" not in args.skip:
        report["syncs"] = []
        for case in SYNC_CASES:
            try:
                report["syncs"].append(check_syncs(case, device, args.dry_run, deadline))
            except Exception as err:  # noqa: BLE001 - reported; the other parts run
                report["syncs"].append({"case": case, **_error(err)})
        print("sync check done", file=sys.stderr, flush=True)
    if "training" not in args.skip:
        try:
            report["training"] = compare_training(device, args.dry_run, args.batch, args.seq,
                                                  args.steps, args.warmup, deadline)
        except Exception as err:  # noqa: BLE001 - reported; the other parts run
            report["training"] = _error(err)
    report["seconds"] = time.perf_counter() - t0
    text = summary(report)
    print(text)
    report["summary"] = text
    paths = [Path(os.environ["OUT"]) / "gpu_check.json"] if os.environ.get("OUT") else []
    paths += [Path(args.json)] if args.json else []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
