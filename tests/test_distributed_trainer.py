"""Data parallel through the Trainer: two CPU processes (gloo) against one on the global batch.

The HF-style script never imports hf_slnb: ``--optim slnb`` comes from the installed package.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_launch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("hf_example_script.py")
COMMON = ["--optim", "slnb", "--do_train", "--report_to", "none", "--disable_tqdm", "true",
          "--dropout", "0.0", "--logging_steps", "1", "--save_strategy", "steps",
          "--save_steps", "2", "--max_train_samples", "64", "--seed", "3",
          "--dataloader_drop_last", "true"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(args: list[str], out: Path, procs: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_port", _port()]
    cmd = launch + [str(SCRIPT), "--output_dir", str(out), *COMMON, *args]
    if procs > 1:
        cmd += ["--use_cpu", "true"]
    res = run_launch(lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                                            env=env))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _weights(out: Path, keys: set[str] | None = None) -> torch.Tensor:
    sd = load_file(str(out / "model.safetensors"))
    return torch.cat([sd[k].double().reshape(-1) for k in sorted(sd) if keys is None or k in keys])


def _keys(out: Path) -> set[str]:
    return set(load_file(str(out / "model.safetensors")))


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_match_one_process_on_the_global_batch(tmp_path: Path, accum: int) -> None:
    steps = ["--max_steps", "4", "--gradient_accumulation_steps", str(accum)]
    _run([*steps, "--per_device_train_batch_size", "4"], tmp_path / "ddp", 2)
    _run([*steps, "--per_device_train_batch_size", "8"], tmp_path / "single", 1)
    ddp, single = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    rel = float((ddp - single).norm() / single.norm())
    assert rel < 1e-5, rel
    # SLNB actually moved the weights (the comparison is not between two untouched models).
    init = tmp_path / "init"
    _run(["--max_steps", "1", "--learning_rate", "1e-12", "--weight_decay", "0",
          "--per_device_train_batch_size", "8"], init, 1)
    assert float((single - _weights(init)).norm() / single.norm()) > 1e-3
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text())
    logged = [h for h in info["log_history"] if "loss" in h]
    assert len(logged) == 4 and all("slnb/step_norm" in h for h in logged)


def test_checkpoint_written_by_two_processes_resumes_exactly(tmp_path: Path) -> None:
    args = ["--max_steps", "4", "--per_device_train_batch_size", "4"]
    _run(args, tmp_path / "full", 2)
    resumed = tmp_path / "resumed"
    _run([*args, "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2")], resumed, 2)
    assert torch.equal(_weights(tmp_path / "full"), _weights(resumed))


# ---------------------------------------------------------------------------------------------
# FSDP2 through the Trainer (``--fsdp``), with Accelerate's FSDP switched on for CPU
# ---------------------------------------------------------------------------------------------
FSDP_LAUNCH = Path(__file__).with_name("_cpu_fsdp_launch.py")


def _run_fsdp(args: list[str], out: Path, state_dict_type: str = "FULL_STATE_DICT") -> None:
    config = out.parent / "fsdp_config.json"
    config.write_text(json.dumps({"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"],
                                  "state_dict_type": state_dict_type}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", _port(), str(FSDP_LAUNCH), str(SCRIPT), "--output_dir", str(out),
           *COMMON, *args, "--use_cpu", "true", "--fsdp", "full_shard",
           "--fsdp_config", str(config)]
    res = run_launch(lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                                            env=env))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    logged = [h for h in info["log_history"] if "loss" in h]
    # Accelerate shards the model after the Trainer built SLNB: SLNB must follow the new
    # parameters (else nothing would be preconditioned). The default preset, whitened,
    # orthogonalises the blocks' layers (0.78 of this GPT-2's parameters); the embeddings
    # take Adam's step.
    assert logged and all(h["slnb/preconditioned_fraction"] > 0.7 for h in logged), logged


def test_fsdp2_trainer_matches_one_process_on_the_global_batch(tmp_path: Path) -> None:
    steps = ["--max_steps", "4", "--gradient_accumulation_steps", "2"]
    _run_fsdp([*steps, "--per_device_train_batch_size", "4"], tmp_path / "fsdp")
    _run([*steps, "--per_device_train_batch_size", "8"], tmp_path / "single", 1)
    # An FSDP save also writes the tied lm_head.weight (the same tensor as the embedding).
    keys = _keys(tmp_path / "fsdp") & _keys(tmp_path / "single")
    fsdp, single = _weights(tmp_path / "fsdp", keys), _weights(tmp_path / "single", keys)
    rel = float((fsdp - single).norm() / single.norm())
    assert rel < 1e-5, rel


@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_fsdp2_trainer_checkpoint_resumes_exactly(tmp_path: Path, state_dict_type: str) -> None:
    args = ["--max_steps", "4", "--per_device_train_batch_size", "4"]
    _run_fsdp(args, tmp_path / "full", state_dict_type)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    sharded = any(p.is_dir() for p in checkpoint.iterdir())  # DCP writes folders of shards
    assert sharded == (state_dict_type == "SHARDED_STATE_DICT"), sorted(checkpoint.iterdir())
    resumed = tmp_path / "resumed"
    _run_fsdp([*args, "--resume_from_checkpoint", str(checkpoint)], resumed, state_dict_type)
    if not sharded:
        assert torch.equal(_weights(tmp_path / "full"), _weights(resumed))
        return
    # A sharded save writes no model file: compare the last checkpoints, model and optimizer.
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        want = _dcp_tensors(tmp_path / "full" / "checkpoint-4" / part, tmp_path / "a.pt")
        got = _dcp_tensors(resumed / "checkpoint-4" / part, tmp_path / "b.pt")
        assert want.keys() == got.keys() and len(want) > 10, (part, sorted(want))
        for key, value in want.items():
            assert torch.equal(got[key], value), (part, key)


def _dcp_tensors(folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``torch.distributed.checkpoint`` folder, by its flattened key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(scratch))
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            out[prefix] = value

    walk("", torch.load(scratch, weights_only=False))
    return out
