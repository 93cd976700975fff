"""The installed package: ``.pth`` auto-registration, an unmodified script, torchrun, accelerate.

These tests build a wheel of the working tree, install it into a throwaway virtual environment
and run ``hf_example_script.py`` (which never imports hf_slnb) as a subprocess, single-process,
under torchrun and under accelerate launch, so the ``.pth`` auto-registration is what they check.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import run_launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "hf_example_script.py"
DIAGNOSTICS = ("slnb/step_norm", "slnb/cg_rel_residual", "slnb/preconditioned_fraction")


# ---------------------------------------------------------------------------------------------
# Installed package: .pth auto-registration, unmodified script, torchrun, accelerate launch
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def venv_python(tmp_path_factory) -> Path:
    """A throwaway venv with the working tree installed from a freshly built wheel.

    The venv sees the packages of the interpreter running the tests (torch, transformers, ...)
    through a ``.pth`` file that lists that interpreter's site-packages: a plain path entry, so the
    ``.pth`` files *there* (an editable install of hf_slnb among them) are not run and hf_slnb
    comes only from the wheel. Nothing depends on the base interpreter's packages. The wheel is
    built by ``pip wheel`` in an isolated build environment (the build requirements of
    ``pyproject.toml``, from the package index).
    """
    base = tmp_path_factory.mktemp("installed")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "_hf_slnb_autoregister.py"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    (src / "README.md").touch()
    shutil.copytree(ROOT / "hf_slnb", src / "hf_slnb",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(dist), str(src)],
                   check=True, cwd=base)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    inner = subprocess.run([str(python), "-c", code],
                           check=True, capture_output=True, text=True).stdout.strip()
    outer = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
             if os.path.isdir(p)]
    Path(inner, "_outer_site_packages.pth").write_text("\n".join(outer) + "\n", encoding="utf-8")
    wheel = next(dist.glob("hf_slnb-*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True, cwd=base)
    return python


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "HF_SLNB_AUTOREGISTER") and not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", **extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return run_launch(lambda: subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True,
                                             text=True, timeout=timeout, check=False))


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


SCRIPT_ARGS = ["--optim", "slnb", "--do_train", "--max_steps", "4", "--logging_steps", "2",
               "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "steps",
               "--save_steps", "4"]


def _check_run(out: Path, proc: subprocess.CompletedProcess, world_size: int) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert "SLNB" in info["optimizer_mro"]
    assert info["world_size"] == world_size
    assert info["learning_rate"] == 5e-5  # the default preset keeps the Trainer's lr
    logged = [h for h in info["log_history"] if "loss" in h]
    assert len(logged) == 2 and all(k in h for h in logged for k in DIAGNOSTICS)
    assert "arxiv.org/abs/2502.01131" in (out / "README.md").read_text()
    return info


@pytest.mark.installed
def test_installed_startup_is_cheap_and_switchable(venv_python: Path, tmp_path: Path) -> None:
    probe = ("import sys; print(sorted(m for m in ('torch', 'transformers', 'hf_slnb') "
             "if m in sys.modules), any(type(f).__name__ == '_HfSlnbFinder' "
             "for f in sys.meta_path))")
    proc = _run([str(venv_python), "-c", probe], tmp_path)
    assert proc.stdout.strip() == "[] True", proc.stderr  # a hook, and no heavy import
    proc = _run([str(venv_python), "-c", probe], tmp_path, HF_SLNB_AUTOREGISTER="0")
    assert proc.stdout.strip() == "[] False", proc.stderr
    # Importing the integration first (it imports transformers itself) registers quietly.
    code = ("from hf_slnb import SLNBTrainingArguments as A; import transformers as t; "
            "print(A(output_dir='o').optim.value, "
            "'slnb' in t.training_args.OptimizerNames._value2member_map_)")
    proc = _run([str(venv_python), "-W", "error::RuntimeWarning", "-c", code], tmp_path)
    assert proc.returncode == 0 and proc.stdout.split()[-2:] == ["slnb", "True"], proc.stderr
    # Switched off: transformers' stock argparse error for an unknown optimizer.
    proc = _run([str(venv_python), str(SCRIPT), "--output_dir", str(tmp_path / "off"),
                 *SCRIPT_ARGS], tmp_path, HF_SLNB_AUTOREGISTER="0")
    assert proc.returncode == 2 and "argument --optim: invalid choice: 'slnb'" in proc.stderr


@pytest.mark.installed
def test_installed_unmodified_script_single_process(venv_python: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run([str(venv_python), str(SCRIPT), "--output_dir", str(out), *SCRIPT_ARGS,
                 "--weight_decay", "0.01", "--optim_args", "cg_iters=3"], tmp_path)
    _check_run(out, proc, world_size=1)
    # A checkpoint's training_args.bin loads in a fresh process that never imports hf_slnb.
    load = ("import torch; a = torch.load('training_args.bin', weights_only=False); "
            "print(a.optim.value, a.optim_args)")
    proc = _run([str(venv_python), "-c", load], out / "checkpoint-4")
    assert proc.returncode == 0 and proc.stdout.split()[-2:] == ["slnb", "cg_iters=3"], proc.stderr


@pytest.mark.installed
def test_installed_torchrun_two_processes(venv_python: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run([str(venv_python), "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", str(SCRIPT), "--use_cpu", "true",
                 "--output_dir", str(out), *SCRIPT_ARGS], tmp_path, timeout=240)
    _check_run(out, proc, world_size=2)


@pytest.mark.installed
def test_installed_accelerate_launch_two_processes(venv_python: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for _ in range(2):  # a port picked free may be taken before the launcher binds it
        proc = _run([str(venv_python), "-m", "accelerate.commands.launch", "--multi_gpu",
                     "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no", "--main_process_port", _free_port(), str(SCRIPT),
                     "--use_cpu", "true", "--output_dir", str(out), *SCRIPT_ARGS], tmp_path,
                    timeout=240)
        if "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    _check_run(out, proc, world_size=2)
