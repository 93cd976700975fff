"""Where one SLNB step's time goes: wall time of ``SLNB.step`` and of its phases (the direction,
the inverse-root refresh, the orthogonalisation, the screen, ...), mean ms per step over 30
steps of ``scripts/benchmark_step.py``'s model, after 5 warm-up steps. Phases nest (``step``
holds the rest; ``dir.compute`` holds ``refresh`` and ``orthogonalise``). Also the forward and
backward's capture work: the committing hooks' time per step (``capture hooks``).

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 python benchmarks/step_phases.py [MODEL] [KEY=VALUE ...]   # SLNB options
"""

import collections
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_step as bs

from hf_slnb import directions, hooks, optimizer, step, step_rules

spent: collections.Counter = collections.Counter()


def timed(owner: object, name: str, label: str) -> None:
    """Wrap ``owner.name`` so that its wall time adds to ``spent[label]``."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


for name in ("step", "_begin_step", "_reduce_captures", "_screen", "_apply", "_end_step"):
    timed(optimizer.SLNB, name, name)
timed(step.StepContext, "__init__", "context")
timed(step.StepContext, "momentum", "momentum")
timed(step.StepContext, "statistics", "statistics")
timed(step_rules.AdamGraft, "before", "rule.before")
timed(step_rules.OrthAdam, "before", "rule.before")
timed(step_rules.OrthAdam, "updates", "rule.updates")
timed(step_rules, "metric_norm", "metric_norm")
optimizer.metric_norm = step_rules.metric_norm
timed(directions.WhitenedOrth, "compute", "dir.compute")
timed(directions.WhitenedOrth, "refresh", "refresh")
timed(directions.WhitenedOrth, "orthogonalise", "orthogonalise")
timed(hooks.CaptureHook, "commit", "capture hooks")


def option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


model_name = sys.argv[1] if len(sys.argv) > 1 and "=" not in sys.argv[1] else "llama-tiny"
options = dict(option(a) for a in sys.argv[1:] if "=" in a)
torch.manual_seed(0)
model = bs.build(model_name, 128)
opt = bs.make_optimizer("slnb", model, options)
data = torch.randint(0, model.config.vocab_size, (16, 128))
for _ in range(5):
    bs.one_step(model, opt, data)
spent.clear()
steps = 30
start = time.perf_counter()
for _ in range(steps):
    bs.one_step(model, opt, data)
total = (time.perf_counter() - start) / steps
print(f"{model_name}, preset {opt.preset}, {options or 'its options'}, threads "
      f"{torch.get_num_threads()}: {total * 1e3:.1f} ms per step (forward, backward, step)")
for label, seconds in spent.most_common():
    print(f"  {label:16s} {seconds / steps * 1e3:7.2f} ms")
