#!/usr/bin/env python
"""The SLNB paper's small experiments, offline: SLNB against Adam in epochs and in wall time.

D. Munoz, "Simple Linear Neuron Boosting" (arXiv 2502.01131) compares SLNB with Adam on small
problems. This script runs offline versions of them with a plain torch loop (``hf_slnb.SLNB``
directly, no Trainer, with the ``paper`` preset: the published algorithm, lr a trust-region
radius), each optimizer with a small learning-rate sweep (the best lr is plotted):

* ``mlp``: a two-hidden-layer MLP (64-128-128-10, ReLU) on scikit-learn's digits (8x8 images,
  1,797 samples, 80/20 split), pixels scaled to [0, 1];
* ``mf``: a matrix factorisation: two bias-free ``nn.Linear`` layers ``y = W2 W1 x`` fit a
  rank-5 map (50 -> 50) from 2,000 correlated inputs (condition number 100), mean squared error;
* ``cnn``: a small CNN (two 3x3 convolutions, max-pool, linear head) on the digits as 1x8x8
  images;
* ``invariance``: the MLP trained on the raw pixels (0-16) and on ``100 * x + 5``, starting from
  the same function (the first layer is reparametrised to match). SLNB whitens every layer's
  inputs, so its two loss curves nearly coincide; Adam's do not. Weight decay is off here (it
  is not invariant to a change of coordinates, for either optimizer).

Writes ``paper_experiments.png`` and ``results.json`` into ``--output-dir`` and prints a
markdown summary. Run::

    python scripts/reproduce_paper.py                      # the default, ~3 minutes on 2 CPU cores
    python scripts/reproduce_paper.py --quick              # smoke test, a few seconds
    python scripts/reproduce_paper.py --experiments mlp,invariance --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import hf_slnb

EXPERIMENTS = ("mlp", "mf", "cnn", "invariance")


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------
def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits (shipped with it, no download): raw pixels 0-16, 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def low_rank_problem(seed: int = 0, n: int = 2000, dim: int = 50, rank: int = 5,
                     condition: float = 100.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs with covariance of condition number ``condition``; targets ``M x``, rank(M) = rank."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    scales = torch.logspace(0.0, math.log10(condition) / 2, dim)  # std spread: cond of cov
    mix = q * scales  # x = z @ mix.T has covariance q diag(scales^2) q^T
    x = torch.randn(n, dim, generator=g) @ mix.T / scales.mean()
    m = torch.randn(dim, rank, generator=g) @ torch.randn(rank, dim, generator=g) / rank
    y = x @ m.T
    cut = int(0.8 * n)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def mlp(width: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def factorisation(dim: int = 50, rank: int = 5) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=False))


#: SLNB preset used here: ``paper`` is the published algorithm (ALGORITHM.md); set by main().
SLNB_PRESET = {"preset": "paper"}
#: Learning-rate schedule of every run (``cosine`` or ``constant``); set by main().
SCHEDULE = {"name": "cosine"}


def make_optimizer(name: str, model: nn.Module, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "slnb":
        return hf_slnb.SLNB(model.parameters(), model=model, lr=lr, weight_decay=weight_decay,
                            preset=SLNB_PRESET["preset"])
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}: must be 'slnb' or 'adam'.")


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
@dataclass
class History:
    """Per epoch (epoch 0 = initialisation): losses, accuracy and cumulative training seconds."""

    optimizer: str
    lr: float
    seed: int
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.test_loss[-1]


def evaluate(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor,
             y: Tensor) -> tuple[float, float]:
    """Loss and (for classification) accuracy on the whole of ``x``."""
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = float(loss_fn(out, y))
        acc = float((out.argmax(-1) == y).float().mean()) if y.dtype == torch.long else math.nan
    model.train()
    return loss, acc


def train(model: nn.Module, data: tuple[Tensor, Tensor, Tensor, Tensor], loss_fn: Any,
          opt_name: str, lr: float, epochs: int, batch_size: int, seed: int,
          weight_decay: float = 0.0) -> History:
    """Mini-batch training with the ``SCHEDULE``; evaluate train and test loss every epoch."""
    x, y, x_test, y_test = data
    optimizer = make_optimizer(opt_name, model, lr, weight_decay)
    total = epochs * math.ceil(len(x) / batch_size)
    # Cosine decay to zero over the run for both optimizers: with a constant lr SLNB's step keeps
    # the trust-region length and never settles (nor does Adam's, to a lesser degree).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda t: 0.5 * (1.0 + math.cos(math.pi * t / total)))
        if SCHEDULE["name"] == "cosine" else (lambda t: 1.0),
    )
    hist = History(opt_name, lr, seed)
    g = torch.Generator().manual_seed(seed)

    def record(seconds: float) -> None:
        train_loss, _ = evaluate(model, loss_fn, x, y)
        test_loss, acc = evaluate(model, loss_fn, x_test, y_test)
        hist.train_loss.append(train_loss)
        hist.test_loss.append(test_loss)
        hist.test_accuracy.append(acc)
        hist.seconds.append(seconds)

    record(0.0)
    elapsed = 0.0
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        elapsed += time.perf_counter() - start
        record(elapsed)
        if not math.isfinite(hist.train_loss[-1]):
            break  # diverged: keep what we have
    if isinstance(optimizer, hf_slnb.SLNB):
        optimizer.remove_hooks()
    return hist


# ---------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    epochs: int
    batch_size: int
    seeds: list[int]
    lrs: dict[str, list[float]]


def sweep(name: str, build: Callable[[], nn.Module], data: tuple[Tensor, Tensor, Tensor, Tensor],
          loss_fn: Any,
          cfg: Config) -> dict[str, Any]:
    """Every optimizer at every lr and seed, from the same initial weights per seed."""
    runs: list[History] = []
    for opt_name, lrs in cfg.lrs.items():
        for lr in lrs:
            for seed in cfg.seeds:
                torch.manual_seed(seed)
                runs.append(train(build(), data, loss_fn, opt_name, lr, cfg.epochs,
                                  cfg.batch_size, seed))
    return {"name": name, "runs": runs}


def invariance(cfg: Config, best: dict[str, float] | None = None, scale: float = 100.0,
               shift: float = 5.0) -> dict[str, Any]:
    """The MLP on raw pixels and on ``scale * x + shift``, from the same function, per optimizer.

    Each optimizer uses ``best[name]`` (the MLP experiment's best lr: pixels / 16 are themselves an
    affine change of the raw pixels) where given, else the middle of its sweep.
    """
    x, y, x_test, y_test = digits()
    transformed = (scale * x + shift, y, scale * x_test + shift, y_test)
    ce = nn.CrossEntropyLoss()
    runs: dict[str, dict[str, History]] = {}
    for opt_name, lrs in cfg.lrs.items():
        lr = (best or {}).get(opt_name, lrs[len(lrs) // 2])
        seed = cfg.seeds[0]
        torch.manual_seed(seed)
        original = mlp()
        twin = mlp()
        twin.load_state_dict(original.state_dict())
        with torch.no_grad():  # W' x' + b' = W x + b  for  x' = scale x + shift
            first = twin[0]
            assert isinstance(first, nn.Linear)  # not user input: the model built above
            first.bias.sub_(first.weight.sum(1) * shift / scale)
            first.weight.div_(scale)
        runs[opt_name] = {
            "original": train(original, (x, y, x_test, y_test), ce, opt_name, lr, cfg.epochs,
                              cfg.batch_size, seed),
            "transformed": train(twin, transformed, ce, opt_name, lr, cfg.epochs,
                                 cfg.batch_size, seed),
        }
    return {"name": "invariance", "scale": scale, "shift": shift, "runs": runs}


def best_lr(runs: Sequence[History], opt_name: str) -> float:
    """The lr whose mean final test loss over seeds is lowest (diverged runs lose)."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if r.optimizer == opt_name:
            by_lr.setdefault(r.lr, []).append(r.final if math.isfinite(r.final) else math.inf)
    return min(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))


def mean_curve(runs: Sequence[History], opt_name: str, lr: float, attr: str) -> list[float]:
    chosen = [getattr(r, attr) for r in runs if r.optimizer == opt_name and r.lr == lr]
    n = min(len(c) for c in chosen)
    return [statistics.fmean(c[i] for c in chosen) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
TITLES = {"mlp": "MLP on digits", "mf": "Matrix factorisation (rank 5)", "cnn": "CNN on digits"}
COLORS = {"slnb": "C0", "adam": "C1"}


def summary_rows(result: dict[str, Any]) -> list[str]:
    """Markdown rows: per optimizer at its best lr, final losses, time and time to Adam's loss."""
    runs: list[History] = result["runs"]
    rows = []
    best = {o: best_lr(runs, o) for o in sorted({r.optimizer for r in runs})}
    adam_final = (statistics.fmean(mean_curve(runs, "adam", best["adam"], "test_loss")[-1:])
                  if "adam" in best else math.nan)
    for opt_name, lr in best.items():
        loss = mean_curve(runs, opt_name, lr, "test_loss")
        secs = mean_curve(runs, opt_name, lr, "seconds")
        acc = mean_curve(runs, opt_name, lr, "test_accuracy")
        hit = next((i for i, v in enumerate(loss) if v <= adam_final), None)
        rows.append(
            f"| {TITLES[result['name']]} | {opt_name} | {lr:g} | {loss[-1]:.4g} | "
            + (f"{acc[-1]:.4f}" if not math.isnan(acc[-1]) else "-") + " | "
            + f"{secs[-1]:.1f} | "
            + (f"{hit} ({secs[hit]:.1f} s)" if hit is not None else "not reached") + " |"
        )
    return rows


def relative_gap(a: Sequence[float], b: Sequence[float], epoch: int) -> float:
    """``|a - b| / a`` after ``epoch`` epochs (the last common one if the run is shorter)."""
    i = min(epoch, len(a) - 1, len(b) - 1)
    return abs(a[i] - b[i]) / max(abs(a[i]), 1e-12)


def invariance_rows(result: dict[str, Any]) -> list[str]:
    rows = []
    for opt_name, pair in result["runs"].items():
        a, b = pair["original"].train_loss, pair["transformed"].train_loss
        gaps = " | ".join(f"{relative_gap(a, b, e):.2%}" for e in (1, 2, 5))
        rows.append(f"| {opt_name} | {pair['original'].lr:g} | {gaps} | {a[-1]:.3g} | "
                    f"{b[-1]:.3g} |")
    return rows


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [k for k in ("mlp", "mf", "cnn") if k in results]
    ncols = len(curves) + (1 if "invariance" in results else 0)
    fig, axes = plt.subplots(2, ncols, figsize=(4.2 * ncols, 7.6), dpi=110, squeeze=False)
    for col, key in enumerate(curves):
        runs: list[History] = results[key]["runs"]
        for opt_name in sorted({r.optimizer for r in runs}):
            lr = best_lr(runs, opt_name)
            loss = mean_curve(runs, opt_name, lr, "test_loss")
            secs = mean_curve(runs, opt_name, lr, "seconds")
            label = f"{opt_name} (lr={lr:g})"
            axes[0, col].plot(range(len(loss)), loss, color=COLORS[opt_name], label=label)
            axes[1, col].plot(secs, loss, color=COLORS[opt_name], label=label)
        axes[0, col].set_title(TITLES[key])
        axes[0, col].set_xlabel("epoch")
        axes[1, col].set_xlabel("training wall time (s)")
        for row in (0, 1):
            axes[row, col].set_ylabel("test loss")
            axes[row, col].set_yscale("log")
            axes[row, col].grid(alpha=0.3)
            axes[row, col].legend()
    if "invariance" in results:
        inv = results["invariance"]
        col = ncols - 1
        for opt_name, pair in inv["runs"].items():
            a, b = pair["original"].train_loss, pair["transformed"].train_loss
            n = min(len(a), len(b))
            axes[0, col].plot(range(len(a)), a, color=COLORS[opt_name],
                              label=f"{opt_name}: x")
            axes[0, col].plot(range(len(b)), b, "--", color=COLORS[opt_name],
                              label=f"{opt_name}: {inv['scale']:g}x+{inv['shift']:g}")
            gaps = [abs(a[i] - b[i]) / max(abs(a[i]), 1e-12) + 1e-16 for i in range(n)]
            axes[1, col].plot(range(n), gaps, color=COLORS[opt_name], label=opt_name)
        axes[0, col].set_title("Invariance to an affine change of inputs")
        axes[0, col].set_ylabel("train loss (MLP, digits)")
        axes[0, col].set_yscale("log")
        axes[1, col].set_ylabel("|loss(x) - loss(x')| / loss(x)")
        axes[1, col].set_yscale("log")
        for row in (0, 1):
            axes[row, col].set_xlabel("epoch")
            axes[row, col].grid(alpha=0.3)
            axes[row, col].legend()
    fig.suptitle(f"SLNB (preset {SLNB_PRESET['preset']!r}) vs Adam on the paper's small problems "
                 "(best lr of each; mean over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, History):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS),
                        help=f"Comma-separated subset of {', '.join(EXPERIMENTS)}.")
    parser.add_argument("--epochs", type=int, default=None,
                        help="Epochs of every experiment (default: mlp/cnn/invariance 20, mf 30).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds. Default 0.")
    parser.add_argument("--slnb-preset", default="paper", choices=("paper", "graft"),
                        help="SLNB preset: 'paper' (the published algorithm, lr a trust-region "
                        "radius; default) or 'graft' (the package default, Adam-like lr).")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                        help="Learning-rate schedule of both optimizers (default: cosine decay "
                        "to zero over the run).")
    parser.add_argument("--slnb-lrs", default=None, help="SLNB's lr sweep (default "
                        "0.03,0.1,0.3,1 with the paper preset, 1e-3,3e-3,1e-2 with graft).")
    parser.add_argument("--adam-lrs", default="1e-3,3e-3,1e-2,3e-2", help="Adam's lr sweep.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: these models are so small that "
                        "a second thread only adds synchronisation; 0 keeps torch's default).")
    parser.add_argument("--output-dir", default="outputs/paper")
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs, one lr each, for smoke tests.")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    for e in experiments:
        if e not in EXPERIMENTS:
            raise SystemExit(f"Unknown experiment {e!r}: choose from {', '.join(EXPERIMENTS)}.")
    SLNB_PRESET["preset"] = args.slnb_preset
    SCHEDULE["name"] = args.schedule
    slnb_lrs = args.slnb_lrs or ("0.03,0.1,0.3,1.0" if args.slnb_preset == "paper"
                                 else "1e-3,3e-3,1e-2")
    lrs = {"slnb": parse_floats(slnb_lrs), "adam": parse_floats(args.adam_lrs)}
    if args.quick:
        lrs = {k: [v[len(v) // 2]] for k, v in lrs.items()}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    def cfg(default_epochs: int) -> Config:
        epochs = 2 if args.quick else (args.epochs or default_epochs)
        return Config(epochs, args.batch_size, seeds, lrs)

    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    ce = nn.CrossEntropyLoss()
    for name in experiments:
        t0 = time.perf_counter()
        if name == "mlp":
            data = digits()
            scaled = (data[0] / 16, data[1], data[2] / 16, data[3])
            results[name] = sweep(name, mlp, scaled, ce, cfg(20))
        elif name == "cnn":
            data = digits()
            scaled = (data[0] / 16, data[1], data[2] / 16, data[3])
            results[name] = sweep(name, cnn, scaled, ce, cfg(20))
        elif name == "mf":
            results[name] = sweep(name, factorisation, low_rank_problem(), nn.MSELoss(), cfg(30))
        else:
            best = ({o: best_lr(results["mlp"]["runs"], o) for o in lrs} if "mlp" in results
                    else None)
            results[name] = invariance(cfg(20), best)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    lines = [("| experiment | optimizer | best lr | final test loss | final test accuracy | "
              "training s | epochs to Adam's final loss |"), "|---|---|---|---|---|---|---|"]
    for name in ("mlp", "mf", "cnn"):
        if name in results:
            lines += summary_rows(results[name])
    if "invariance" in results:
        inv = results["invariance"]
        lines += ["", (f"Invariance (MLP on digits, x versus {inv['scale']:g}x+{inv['shift']:g}, "
                       "same initial function):"), "",
                  ("| optimizer | lr | relative gap after 1 epoch | after 2 | after 5 | "
                   "final train loss on x | on x' |"), "|---|---|---|---|---|---|---|"]
        lines += invariance_rows(inv)
    report = "\n".join(lines)
    print(report)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(results, out / "paper_experiments.png")
    total = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(
        {"report": report, "seconds": total, "command": " ".join(["python", *sys.argv]),
         "results": _jsonable(results)}, indent=1), encoding="utf-8")
    print(f"\nwrote {png} and {out / 'results.json'} in {total:.0f} s")
    return {"report": report, "results": results, "seconds": total}


if __name__ == "__main__":
    main()
