"""The Trainer test's toy (``tests/test_integration.py::_final_loss``): a 16-wide 2-layer GPT-2,
vocabulary 64, next token = previous + 1, 40 steps of batch 8 with the Trainer's defaults but the
lr; prints the final logged train loss per seed, one JSON line per lr.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/trainer_toy.py OPTIM LR,LR,... SEED,SEED [OPTIM_ARGS]
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_integration import args_for, lm_data, tiny_gpt2
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

import hf_slnb  # noqa: F401 - registers --optim slnb

optim, lrs, seeds = sys.argv[1], [float(x) for x in sys.argv[2].split(",")], sys.argv[3]
extra = {"optim_args": sys.argv[4]} if len(sys.argv) > 4 else {}
for lr in lrs:
    losses = []
    for seed in (int(s) for s in seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            args = args_for(Path(tmp), optim=optim, max_steps=40, per_device_train_batch_size=8,
                            logging_steps=5, learning_rate=lr, **extra)
            trainer = Trainer(model=tiny_gpt2(seed=seed), args=args, train_dataset=lm_data(256))
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h][-1])
    print(json.dumps({"optim": optim, "optim_args": extra.get("optim_args"), "lr": lr,
                      "losses": [round(x, 4) for x in losses],
                      "mean": round(sum(losses) / len(losses), 4)}), flush=True)
