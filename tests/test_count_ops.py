"""The op and host-sync counter of ``scripts/benchmark_step.py --count-ops`` counts what it claims.

The counter is checked on functions whose ops are known by construction (one ``.item()``, one
``torch.tensor(1.0)``, one op of each sync kind), on ``torch.optim.AdamW(foreach=True)`` (no sync:
its only scalar reads are of the CPU ``step`` counters, which stay on the host on CUDA too) and
end to end on a 2-layer GPT-2. SLNB's own counts are benchmark numbers and not pinned here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script

pytest.importorskip("transformers")

bench = load_script("benchmark_step")
SCRIPT = Path(bench.__file__)


def _count(fn: Any, *args: Any, host: list[torch.Tensor] | None = None) -> Any:
    return bench.count_ops_in(fn, *args, host=host)


def test_item_and_tensor_from_python_count_once_each() -> None:
    """``.item()`` of a CPU tensor is one ``_local_scalar_dense``; ``torch.tensor(1.0)`` one H2D."""
    x = torch.randn(5)

    def known(x: torch.Tensor) -> torch.Tensor:
        s = x.sum().item()
        return x * torch.tensor(1.0) + s

    c = _count(known, x)
    assert dict(c.syncs["other"]) == {"item": 1, "from_python": 1}
    # sum, _local_scalar_dense, lift_fresh, mul, add: nothing else reaches the dispatcher
    assert dict(c.ops["other"]) == {
        "aten.sum.default": 1, "aten._local_scalar_dense.default": 1,
        "aten.lift_fresh.default": 1, "aten.mul.Tensor": 1, "aten.add.Tensor": 1}
    assert c.device_ops("other") == 5
    sites = list(c.sites["other"])
    assert all(Path(__file__).name in s for s in sites), sites  # the line that asked for it


@pytest.mark.parametrize(("kind", "fn"), [
    ("item", lambda x: bool(x[0] > 0)),
    ("item", lambda x: float(x[1])),
    ("item", lambda x: int(x.argmax())),
    ("item", lambda x: 1 if x.sum() else 0),
    ("nonzero", lambda x: torch.nonzero(x > 0)),
    ("bincount", lambda x: torch.bincount((x > 0).long(), minlength=2)),
    ("unique", lambda x: torch.unique(x)),
    ("masked_select", lambda x: torch.masked_select(x, x > 0)),
    ("bool_index", lambda x: x[x > 0]),
    ("repeat_interleave", lambda x: torch.repeat_interleave((x > 0).long())),
])
def test_each_sync_kind_is_seen(kind: str, fn: Any) -> None:
    c = _count(fn, torch.tensor([0.5, -1.0, 2.0, 3.0]))
    assert dict(c.syncs["other"]) == {kind: 1}


@pytest.mark.parametrize("fn", [
    lambda x: torch.repeat_interleave(x, (x > 0).long() + 1, output_size=7),  # size given
    lambda x: torch.tensor([]).sum() + x,  # empty: nothing is copied
    lambda x: torch.where(x > 0, x, torch.zeros_like(x)).sum(),
    lambda x: torch._foreach_mul([x, x], 2.0),
])
def test_ops_that_do_not_sync(fn: Any) -> None:
    c = _count(fn, torch.tensor([0.5, -1.0, 2.0, 3.0]))
    assert dict(c.syncs["other"]) == {}


def test_host_counters_are_not_syncs() -> None:
    """Reading or bumping a host ``step`` counter, even with ``torch.tensor(1.0)``, is host work."""
    step = torch.zeros(())
    x = torch.randn(3)

    def bump(x: torch.Tensor) -> torch.Tensor:
        step.add_(torch.tensor(1.0))
        t = int(step.item())
        return x * (1.0 - 0.9**t)

    c = _count(bump, x, host=[step])
    assert dict(c.syncs["other"]) == {}
    assert c.host_ops["other"] == 3  # lift_fresh, add_, _local_scalar_dense
    assert c.host_reads["other"] == 1
    assert c.device_ops("other") == 1  # mul
    c = _count(bump, x)  # the same without telling the counter: the read is a sync
    assert dict(c.syncs["other"]) == {"item": 1, "from_python": 1}


def test_adamw_foreach_step_has_no_syncs() -> None:
    row = bench.count_step("gpt2-2l", "adamw", batch=2, seq=8, vocab=64, micro=2, warmup=2,
                           slnb_args={})
    assert row["tensors"] == 28  # 2 blocks x 12 + wte, wpe, ln_f weight and bias
    for phase in ("forward_1", "backward_1", "forward", "backward", "step"):
        assert row["syncs"][phase] == {}, (phase, row["sync_sites"][phase])
    assert row["host_reads"]["step"] == 2 * row["tensors"]  # _get_value(step), twice per tensor
    assert 0 < row["ops"]["step"] < 12  # foreach: a handful of ops for all 28 tensors


def test_count_ops_command_writes_the_table_and_json(tmp_path: Path, monkeypatch: Any,
                                                     capsys: Any) -> None:
    out = tmp_path / "counts.json"
    monkeypatch.setattr(sys, "argv", [
        str(SCRIPT), "--count-ops", "--models", "gpt2-2l", "--optimizers", "adamw,slnb",
        "--batch", "2", "--seq", "8", "--vocab", "64", "--warmup", "4", "--out", str(out)])
    bench.main()
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["optimizer"]) for r in rows] == [("gpt2-2l", "adamw"),
                                                            ("gpt2-2l", "slnb")]
    slnb = rows[1]
    assert slnb["hooked_layers"] == 10  # 4 Conv1D per block, lm_head (owns wte), wpe
    # forward/backward without hooks are the same ops for both optimizers: the difference is
    # what the hooks add, and they add something in every micro-batch of a step that reads the
    # inputs (the default on this GPT-2, whitened, reads those of one step in four: the 5th)
    hook = bench.hook_ops(slnb, rows[0])
    assert hook["first"] > 0 and hook["later"] > 0
    assert sum(hook["by_op"].values()) == hook["first"] * 10
    assert "| gpt2-2l | 28 / 10 | slnb |" in text
    assert "| gpt2-2l | 28 / - | adamw | " in text


@pytest.mark.parametrize(("name", "tensors", "layers"), [("gpt2-12l", 148, 50),
                                                          ("llama-12l", 111, 86)])
def test_issue_models_have_the_issue_sizes(name: str, tensors: int, layers: int) -> None:
    """The counted models are issue 10's: 148 tensors / 50 hooked layers, 111 / 86."""
    model = bench.build_count_model(name, 16, 64)
    opt = bench.make_count_optimizer("slnb", model, {})
    assert sum(1 for _ in model.parameters()) == tensors
    assert len(opt.neurons) == layers


@pytest.mark.parametrize(("argv", "message"), [
    (["--models", "gpt2-10m"], "Invalid --models entry 'gpt2-10m'"),
    (["--optimizers", "adamw,sgd"], "Invalid --optimizers entry 'sgd'"),
    (["--micro-batches", "0"], r"Invalid --micro-batches=0"),
])
def test_bad_count_arguments_are_refused_before_counting(argv: list[str], message: str,
                                                         monkeypatch: Any) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--count-ops", *argv])
    monkeypatch.setattr(bench, "count_step", lambda *a, **k: pytest.fail("counted anyway"))
    with pytest.raises(ValueError, match=message):
        bench.main()


def test_a_spec_can_time_another_checkouts_package(tmp_path: Path) -> None:
    """``slnb@CHECKOUT:...`` builds that checkout's SLNB, imported under a name of its own (so
    two versions run side by side in one process); a path without a package is refused by
    name."""
    import shutil

    root = Path(bench.__file__).resolve().parents[1]
    shutil.copytree(root / "hf_slnb", tmp_path / "hf_slnb")
    model = bench.build("gpt2-tiny", 16)
    opt = bench.make_spec_optimizer(f"slnb@{tmp_path}:preset=whitened,lr=0.01", model)
    assert type(opt).__module__.startswith("hf_slnb_") and type(opt).__name__ == "SLNB"
    assert opt.config.preset == "whitened" and opt.param_groups[0]["lr"] == 0.01
    import hf_slnb

    assert hf_slnb.SLNB is not type(opt)
    data = torch.randint(0, 64, (2, 16))
    model(input_ids=data, labels=data).loss.backward()
    opt.step()
    with pytest.raises(ValueError, match="no hf_slnb package at"):
        bench.make_spec_optimizer(f"slnb@{tmp_path / 'nowhere'}", model)
