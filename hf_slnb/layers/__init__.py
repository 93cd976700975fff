"""Layer helpers: one small class per layer type SLNB preconditions, and their registry.

A new layer type is one :class:`~hf_slnb.layers.base.Neuron` subclass decorated with
:func:`~hf_slnb.layers.base.register_layer` (see ``linear.py``, ``conv.py``, ``embedding.py``).
"""

# ruff: noqa: I001  (the import order is the registration order: Linear before the rest)

from __future__ import annotations

from ..config import BACKENDS
from .base import (
    GRAM_BLOCK,
    LAYER_TYPES,
    Bank,
    Capture,
    Neuron,
    add_gram_upper,
    gram_upper_blocks,
    neuron_for,
    register_layer,
    stat_dtype,
    symmetrize_,
    symmetrized,
)
from .linear import Conv1DNeuron, LinearNeuron, is_hf_conv1d  # registration order: Linear first
from .conv import ConvNeuron
from .embedding import EmbeddingNeuron

__all__ = ["BACKENDS", "GRAM_BLOCK", "LAYER_TYPES", "Bank", "Capture", "Conv1DNeuron",
           "ConvNeuron", "EmbeddingNeuron", "LinearNeuron", "Neuron", "add_gram_upper",
           "gram_upper_blocks", "is_hf_conv1d", "neuron_for", "register_layer",
           "stat_dtype", "symmetrize_", "symmetrized"]
