"""``nn.Embedding``: a linear map of a one-hot input, weight ``(vocab, dim)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import Vec
from .base import Capture, Neuron, register_layer


@register_layer(lambda m, emb: emb and isinstance(m, nn.Embedding))
class EmbeddingNeuron(Neuron):
    """The input's second moment is the diagonal of token frequencies, so the metric is diagonal
    and exact: ``A(V)[i] = counts[i] / N * V[i]``. Counted with ``index_add_`` (``bincount``'s
    output size would make a GPU wait for the host)."""

    kind = "embedding"
    feature_axis = 0
    one_hot = True
    supports_matrix_free = False

    def choose_explicit(self, rows: int, diagonal_only: bool, distributed: bool) -> bool:
        return False  # the counts are the whole metric: no gram, no inputs

    def open_capture(self, explicit: bool) -> Capture:
        cap = super().open_capture(False)
        if getattr(self, "_one", None) is None or self._one.dtype != cap.sum_x.dtype or \
                self._one.device != cap.sum_x.device:
            self._one = torch.ones((), dtype=cap.sum_x.dtype, device=cap.sum_x.device)
        return cap

    def record(self, x: Tensor, out_positions: int, diagonal_only: bool, distributed: bool) -> None:
        cap = self.capture or self.open_capture(False)
        idx = x.reshape(-1)
        cap.sum_x.index_add_(0, idx, self._one.expand(idx.numel()))
        cap.count += idx.numel()
        cap.n_out += idx.numel()

    def reduce_input(self, x: Tensor) -> tuple[Tensor, Tensor | None, bool]:
        with torch.no_grad():  # token counts (the step copies them to the squares: one-hot)
            counts = torch.zeros(self.num_features, dtype=self.dtype, device=self.weight.device)
            idx = x.reshape(-1)
            counts.index_add_(0, idx, torch.ones(idx.shape, dtype=self.dtype, device=idx.device))
            return counts, None, False

    def positions(self, x: Tensor, output: Tensor) -> tuple[int, int]:
        return x.numel(), x.numel()

    def prepare(self, ridge: float, n_out: Tensor) -> None:
        super().prepare(ridge, n_out)
        cap = self.capture
        assert cap is not None
        self._diag = (cap.sum_x / n_out + ridge)[:, None]

    def precondition_stacked(self, v: Vec, mu: Tensor, inv_denom: Tensor) -> Vec:
        return (v[0] * inv_denom[:, :, None],)

    def metric(self, v: Vec) -> Vec:
        return (v[0] * self._diag,)
