"""hf_slnb: Simple Linear Neuron Boosting (arXiv 2502.01131) for PyTorch and the Hugging Face Trainer.

The core (:class:`SLNB`) imports torch only; the Trainer glue is imported on first use.
"""

from __future__ import annotations

from typing import Any

from .optimizer import PAPER_URL, SLNB

__version__ = "0.1.0"

_LAZY = {
    "register": "integration",
    "SLNBTrainingArguments": "integration",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PAPER_URL", "SLNB", "SLNBTrainingArguments", "__version__", "register"]
