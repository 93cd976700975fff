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


def _weights(out: Path) -> torch.Tensor:
    sd = load_file(str(out / "model.safetensors"))
    return torch.cat([sd[k].double().reshape(-1) for k in sorted(sd)])


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
