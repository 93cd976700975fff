"""``nn.Linear`` (weight ``(out, in)``) and Hugging Face's ``Conv1D`` (the same map, ``(in, out)``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..functional import Vec, precondition_stacked
from .base import SHARED_GRAM, SHARED_SUMS, Neuron, register_layer, sampled_moments, symmetrized


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``, recognised without importing it."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


@register_layer(lambda m, emb: isinstance(m, nn.Linear))
class LinearNeuron(Neuron):
    """``y = x W^T + b``: features on the input's last axis and the weight's axis 1."""

    kind = "linear"
    feature_axis = 1

    @property
    def features_last(self) -> bool:
        return self.feature_axis == 1

    def record(self, x: Tensor, out_positions: int, diagonal_only: bool, distributed: bool) -> None:
        if x.dim() == 1:
            x = x[None]
        d = x.shape[-1]
        rows = x.numel() // max(d, 1)
        cap = self.capture or self.open_capture(
            self.choose_explicit(rows, diagonal_only, distributed))
        if self.bank_gram is not None:  # Bank.keep_grams: every sum from the kept rows
            gram, total = SHARED_GRAM.of(x, (cap.gram.dtype, self.gram_rows, self.gram_blocks),
                                         lambda: sampled_moments(x, d, self.gram_rows,
                                                                 cap.gram.dtype, self.gram_blocks))
            cap.gram.add_(gram)  # and Σ x², its diagonal, at the step: Bank.squares_from_grams
            cap.sum_x.add_(total)
            cap.count += rows
            cap.n_out += rows
            return
        SHARED_SUMS.add_to(cap.sum_x, cap.sum_x2, x)  # shared by layers reading x
        cap.count += rows
        cap.n_out += rows
        if diagonal_only:
            return
        if cap.gram is not None:
            SHARED_GRAM.add_to(cap.gram, x, d)
        else:
            self._keep(cap, x, rows)
            self._fold_if_cheaper(cap, distributed)

    def precondition_stacked(self, v: Vec, mu: Tensor, inv_denom: Tensor) -> Vec:
        return precondition_stacked(v, mu, inv_denom, self.feature_axis)

    def prepare(self, ridge: float, n_out: Tensor) -> None:
        super().prepare(ridge, n_out)
        cap = self.capture
        assert cap is not None
        self._sn = cap.sum_x / n_out
        if cap.gram is not None:  # (X^T X / N + ridge I): one product per metric multiplication
            self._gr = symmetrized(cap.gram) / n_out
            self._gr.diagonal().add_(ridge)

    def stacked_metric(self, bank: Any, stats: Any, ridge: Any) -> Any:
        """With every layer's explicit ``sum x x^T``: ``V C + b sn^T`` and ``b + V sn`` for the
        stack, ``C = X^T X / N + ridge I`` (``(L, d, d)``), ``sn = sum x / N``."""
        caps = [n.capture for n in bank.neurons]
        if any(c is None or c.gram is None for c in caps):
            return None
        n_out = stats.n_out  # (L, 1, 1)
        c = torch.stack([symmetrized(cap.gram) for cap in caps]).div_(n_out)
        ridge = ridge.reshape(-1, 1) if isinstance(ridge, Tensor) else ridge
        c.diagonal(dim1=1, dim2=2).add_(ridge)
        sn = bank.sum_x / n_out[:, 0]  # (L, d)
        last = self.features_last

        def matvec(v: Vec) -> Vec:
            w = v[0]
            aw = torch.bmm(w, c) if last else torch.bmm(c, w)
            if len(v) == 1:
                return (aw,)
            b = v[1]
            if last:  # (L, out, in)
                return (aw.baddbmm_(b[:, :, None], sn[:, None, :]),
                        torch.baddbmm(b[:, :, None], w, sn[:, :, None])[:, :, 0])
            return (aw.baddbmm_(sn[:, :, None], b[:, None, :]),  # (L, in, out)
                    torch.baddbmm(b[:, None, :], sn[:, None, :], w)[:, 0, :])

        return matvec

    def metric(self, v: Vec) -> Vec:
        cap = self.capture
        assert cap is not None
        w = v[0]
        b = v[1] if len(v) == 2 else None
        last = self.features_last
        if cap.gram is not None:
            aw = w @ self._gr if last else self._gr @ w
            if b is None:
                return (aw,)
            if last:
                return (aw.addr_(b, self._sn), torch.addmv(b, w, self._sn))
            return (aw.addr_(self._sn, b), torch.addmv(b, w.T, self._sn))
        wr = w if last else w.T  # (out, in) view
        aw = torch.zeros_like(wr)
        ab = None if b is None else torch.zeros_like(b)
        for x in cap.inputs:
            xs = x.reshape(-1, x.shape[-1]).to(self.dtype)
            y = xs @ wr.T
            if b is not None:
                y += b
                ab += y.sum(0)  # type: ignore[operator]
            aw.addmm_(y.T, xs)
        out = [aw] if ab is None else [aw, ab]
        self._reduce(out)
        out = [t / self.n_out for t in out]
        out[0] = out[0].add_(wr, alpha=self.ridge)
        if not last:
            out[0] = out[0].T
        return tuple(out)


@register_layer(lambda m, emb: is_hf_conv1d(m) and getattr(m, "weight", None) is not None
                and m.weight.dim() == 2)
class Conv1DNeuron(LinearNeuron):
    """Hugging Face ``Conv1D`` (GPT-2 family): ``y = x W + b`` with the weight stored ``(in, out)``."""

    kind = "conv1d_hf"
    feature_axis = 0
