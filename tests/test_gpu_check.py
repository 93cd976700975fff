"""``scripts/gpu_check.py --dry-run``: every part runs on the CPU, and a failing part is reported.

The GPU numbers themselves need a CUDA machine; these tests check the code paths, the CPU stand-in
of the sync debug mode, and that the side-by-side training compares like with like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script

pytest.importorskip("transformers")

gpu_check = load_script("gpu_check")


def test_cpu_sync_guard_raises_on_item_but_not_on_host_counters() -> None:
    x, step = torch.randn(4), torch.zeros(())
    with pytest.raises(RuntimeError, match="synchronizing"), gpu_check.sync_debug(
            "error", torch.device("cpu"), set()):
        x.sum().item()
    with gpu_check.sync_debug("error", torch.device("cpu"), {step.data_ptr()}):
        step.add_(1)
        assert step.item() == 1.0
        y = x * 2.0 + torch.tensor([]).sum()  # an empty tensor from Python copies nothing
    assert torch.equal(y, x * 2.0)


def test_dry_run_reports_every_part(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    report = gpu_check.main(["--dry-run", "--skip", "tests", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["summary"] == (
        report["summary"])
    assert json.loads((tmp_path / "r.json").read_text())["syncs"] == report["syncs"]
    assert [s["case"] for s in report["syncs"]] == ["graft", "paper", "whitened", "adamw"]
    adamw = report["syncs"][3]
    assert all(adamw["error_mode"][ph]["ok"] for ph in gpu_check.PHASES), adamw
    assert adamw["warn_counts"] == {"forward": 0, "backward": 0, "step": 0}
    for s in report["syncs"][:3]:  # SLNB: pass or fail, each phase has a verdict and a count
        assert set(s["error_mode"]) == set(gpu_check.PHASES)
        assert set(s["warn_counts"]) == set(gpu_check.PHASES)
    tr = report["training"]
    assert tr["timed_steps"] == {"slnb": 3, "whitened": 3, "adamw": 3}
    # same initialisation, same first batch, no dropout: the first losses are the same number
    assert tr["first_loss"]["slnb"] == tr["first_loss"]["whitened"] == tr["first_loss"]["adamw"]
    finals = {tr["final_loss"][k] for k in ("slnb", "whitened", "adamw")}
    assert len(finals) == 3  # and the three trained, each its own way
    for k, suffix in (("slnb", ""), ("whitened", "_whitened")):
        assert tr["time_ratio" + suffix] == (tr["median_step_s"][k]
                                             / tr["median_step_s"]["adamw"])
    text = capsys.readouterr().out
    assert "| AdamW(fused=True) | ok | ok | ok | 0 / 0 / 0 | - |" in text
    assert "**SLNB / AdamW**" in text
    assert "**whitened / AdamW**" in text
    assert "| SLNB preset='whitened' | ok | ok | ok | 0 / 0 / 0 |" in text  # no sync on the CPU


def test_a_failing_part_is_reported_and_the_rest_runs(monkeypatch: Any) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise ValueError("boom")

    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(gpu_check, "check_syncs", boom)
    monkeypatch.setattr(gpu_check, "peak_memory", boom)
    report = gpu_check.main(["--dry-run", "--skip", "tests", "--steps", "1"])
    assert [s["error"] for s in report["syncs"]] == ["ValueError: boom"] * 4
    assert report["training"]["errors"]["memory/slnb"]["error"] == "ValueError: boom"
    assert report["training"]["timed_steps"] == {"slnb": 1, "whitened": 1, "adamw": 1}
    assert "failed: ValueError: boom" in report["summary"]


def test_run_tests_names_the_failures(tmp_path: Path) -> None:
    test = tmp_path / "test_two.py"
    test.write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert False\n")
    res = gpu_check.run_tests([str(test)], timeout=60, env={})
    assert res["ok"] is False
    assert [f.split("::")[-1] for f in res["failed"]] == ["test_bad"]
    assert "1 failed, 1 passed" in res["summary"]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid --steps=0"):
        gpu_check.main(["--dry-run", "--steps", "0"])
