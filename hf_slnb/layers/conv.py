"""``nn.Conv1d/2d/3d`` with any stride, padding, dilation, padding mode and groups."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import Vec
from .base import Neuron, register_layer


@register_layer(lambda m, emb: isinstance(m, nn.modules.conv._ConvNd) and not m.transposed)
class ConvNeuron(Neuron):
    """Features are input channels; the preconditioner broadcasts each channel's statistics over
    the kernel's taps. The metric is matrix-free: the layer run with the vector as its weights,
    then its weight gradient (``N`` = batch x output positions)."""

    kind = "conv"
    feature_axis = 1
    supports_explicit = False

    @property
    def row_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.weight.dim()))

    @property
    def num_features(self) -> int:
        return self.module.in_channels  # type: ignore[return-value]

    def out_positions(self, output: Tensor) -> int:
        spatial = self.weight.dim() - 2
        if output.dim() == spatial + 1:
            return math.prod(output.shape[1:])
        return output.shape[0] * math.prod(output.shape[2:])

    def record(self, x: Tensor, out_positions: int, diagonal_only: bool, distributed: bool) -> None:
        if x.dim() == self.weight.dim() - 1:  # unbatched input
            x = x.unsqueeze(0)
        cap = self.capture or self.open_capture(False)
        dims, dt = (0, *range(2, x.dim())), self.dtype
        cap.sum_x.add_(torch.sum(x, dims, dtype=dt))
        norm = torch.linalg.vector_norm(x, 2, dims, dtype=dt)
        cap.sum_x2.addcmul_(norm, norm)
        cap.count += x.numel() // x.shape[1]
        cap.n_out += out_positions
        if not diagonal_only:
            self._keep(cap, x, 0)  # rows: unused (no explicit conv backend)

    def reduce_input(self, x: Tensor) -> tuple[Tensor, Tensor | None, bool]:
        with torch.no_grad():
            if x.dim() == self.weight.dim() - 1:
                x = x.unsqueeze(0)
            dims, dt = (0, *range(2, x.dim())), self.dtype
            return (torch.sum(x, dims, dtype=dt), torch.linalg.vector_norm(x, 2, dims, dtype=dt),
                    False)

    def positions(self, x: Tensor, output: Tensor) -> tuple[int, int]:
        batched = x if x.dim() == self.weight.dim() else x.unsqueeze(0)
        return batched.numel() // batched.shape[1], self.out_positions(output)

    def precondition_stacked(self, v: Vec, mu: Tensor, inv_denom: Tensor) -> Vec:
        groups = self.module.groups  # type: ignore[attr-defined]
        L = v[0].shape[0]
        w = v[0].reshape(L, groups, v[0].shape[1] // groups, v[0].shape[2], -1)
        mu5 = mu.reshape(L, groups, 1, -1, 1)
        inv5 = inv_denom.reshape(L, groups, 1, -1, 1)
        if len(v) == 1:
            return ((w * inv5).reshape(v[0].shape),)
        b5 = v[1].reshape(L, groups, -1, 1, 1)
        w2 = (w - mu5 * b5) * inv5
        b2 = v[1] - (w2 * mu5).sum((3, 4)).reshape(L, -1)
        return (w2.reshape(v[0].shape), b2)

    def metric(self, v: Vec) -> Vec:
        cap = self.capture
        assert cap is not None
        conv = self.module._conv_forward  # type: ignore[operator]
        out = [torch.zeros_like(t) for t in v]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in v]
            b = leaves[1] if len(leaves) == 2 else None
            for x in cap.inputs:
                y = conv(x.to(self.dtype), leaves[0], b)
                for acc, gr in zip(out, torch.autograd.grad(y, leaves, grad_outputs=y.detach())):
                    acc += gr
        self._reduce(out)
        out = [t / self.n_out for t in out]
        out[0].add_(v[0], alpha=self.ridge)
        return tuple(out)
