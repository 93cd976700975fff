"""One small helper per layer type that SLNB preconditions.

A *neuron* is a module linear in its parameters. Its helper knows three things: how to turn the
module's input into per-feature statistics (and the metric's raw material), how to apply the
diagonal incomplete-Cholesky preconditioner, and how to multiply by the metric ``J^T J / N``.
Vectors are tuples ``(weight,)`` or ``(weight, bias)`` in the parameters' own layouts.

Adding a layer type means writing one subclass and adding it to :func:`neuron_for`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .functional import Vec

BACKENDS = ("auto", "explicit", "matrix_free")


@dataclass
class Capture:
    """What a neuron saw between two optimizer steps. Transient: never saved, cleared each step.

    Attributes:
        sum_x: Sum of the input features over every input position, shape ``(d,)``.
        sum_x2: Sum of their squares, shape ``(d,)``.
        count: Number of input positions (a 0-d tensor, so it can be all-reduced with the rest).
        n_out: Number of output positions ``N`` of the metric (0-d tensor).
        gram: Explicit backend: ``sum x x^T`` over input positions (``(d, d)``), else ``None``.
        inputs: Matrix-free backend: private copies of the inputs (a caller may refill its
            tensors after the forward), each ``(rows, d)`` or a convolution's batch.
        explicit: Which backend this step uses: with ``"auto"`` the inputs are kept until the
            step's rows make the explicit second moment cheaper, then folded into ``gram``.
        rows: Rows of the kept inputs.
        task: The backward pass that last added to this capture (see ``hooks.CaptureHook``).
    """

    sum_x: Tensor
    sum_x2: Tensor
    count: Tensor
    n_out: Tensor
    gram: Tensor | None = None
    inputs: list[Tensor] = field(default_factory=list)
    explicit: bool = True
    rows: int = 0
    task: int = -1

    def square_sums(self) -> Tensor:
        """Sum of squared features (the gram's diagonal when the explicit backend is used)."""
        return torch.diagonal(self.gram) if self.gram is not None else self.sum_x2

    def tensors(self) -> list[Tensor]:
        """The tensors that a data-parallel reduction sums (inputs excluded)."""
        out = [self.sum_x, self.sum_x2, self.count, self.n_out]
        if self.gram is not None:
            out.extend(gram_upper_blocks(self.gram))
        return out


GRAM_BLOCK = 256


def add_gram_upper(gram: Tensor, x: Tensor, block: int = GRAM_BLOCK) -> None:
    """``gram += x^T x`` on the diagonal and upper blocks only (symmetry saves up to half).

    Blocks strictly below the diagonal are left untouched; :func:`symmetrized` fills them.
    """
    d = x.shape[1]
    if d <= block:
        gram.addmm_(x.T, x)
        return
    for i in range(0, d, block):
        xi = x[:, i : i + block]
        gram[i : i + block, i:].addmm_(xi.T, x[:, i:])


def gram_upper_blocks(gram: Tensor, block: int = GRAM_BLOCK) -> list[Tensor]:
    """The views of a gram that :func:`add_gram_upper` fills (all a reduction needs to sum)."""
    d = gram.shape[0]
    if d <= block:
        return [gram]
    return [gram[i : i + block, i:] for i in range(0, d, block)]


def symmetrized(gram: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """A full symmetric copy of a gram accumulated by :func:`add_gram_upper`."""
    if gram.shape[0] <= block:
        return gram.clone()
    upper = torch.triu(gram)
    return upper + torch.triu(gram, diagonal=1).T


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or the parameter's dtype, whichever is wider."""
    return torch.promote_types(dtype, torch.float32)


class Neuron:
    """Base helper: bookkeeping shared by every layer type.

    Args:
        name: The module's qualified name (for messages and ``skip_modules``).
        module: The module.
        weight: Its weight parameter.
        bias: Its bias parameter, or ``None``.
        backend: ``"auto"``, ``"explicit"`` or ``"matrix_free"``.
    """

    kind = "neuron"
    supports_explicit = True
    supports_matrix_free = True
    #: Axes of the weight that one output unit's row spans (for per-row step sizes).
    row_dims: tuple[int, ...] = ()

    def __init__(
        self, name: str, module: nn.Module, weight: Tensor, bias: Tensor | None, backend: str
    ) -> None:
        self.name = name
        self.module = module
        self.weight = weight
        self.bias = bias
        self.backend = backend
        self.capture: Capture | None = None
        self.cg_iters_hint = 2
        self.ridge = 0.0
        self.reduce_fn: Callable[[list[Tensor]], None] | None = None
        #: The slot of a head fed from its backbone's hidden states, while the forward that
        #: made it may still call the head itself (see ``hooks``); a weak reference.
        self.pending_head: Callable[[], object] | None = None

    # -- statistics -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The statistics' dtype, followed from the weight (``model.double()`` may change it)."""
        return stat_dtype(self.weight.dtype)

    @property
    def num_features(self) -> int:
        raise NotImplementedError

    def _new_capture(self, explicit: bool) -> Capture:
        d, dev = self.num_features, self.weight.device
        zeros = torch.zeros(d, dtype=self.dtype, device=dev)
        return Capture(
            sum_x=zeros,
            sum_x2=zeros.clone(),
            count=torch.zeros((), dtype=self.dtype, device=dev),
            n_out=torch.zeros((), dtype=self.dtype, device=dev),
            gram=torch.zeros(d, d, dtype=self.dtype, device=dev) if explicit else None,
            explicit=explicit,
        )

    def choose_explicit(self, rows: int, diagonal_only: bool, distributed: bool) -> bool:
        """Whether this step keeps the explicit second moment (else the inputs themselves)."""
        if diagonal_only:
            return False
        if self.backend == "explicit" or not self.supports_matrix_free:
            return self.supports_explicit
        if self.backend == "matrix_free" or not self.supports_explicit:
            return False
        if distributed:
            return True  # one all-reduce of d x d instead of one per conjugate-gradient product
        return self.explicit_is_cheaper(rows)

    def explicit_is_cheaper(self, rows: int) -> bool:
        """Flop estimate: ``rows d^2 + (k+1) out d^2`` against ``(k+1) 2 rows d out``."""
        d = self.num_features
        out = self.weight.numel() // max(d, 1)
        k1 = self.cg_iters_hint + 1
        return rows * d * d + k1 * out * d * d <= 2 * k1 * rows * d * out

    def record(self, x: Tensor, out_positions: int, diagonal_only: bool, distributed: bool) -> None:
        """Add one forward's input to this step's capture (called from a backward hook)."""
        raise NotImplementedError

    def _keep(self, cap: Capture, x: Tensor, source: Tensor, rows: int) -> None:
        """Keep a private copy of an input for the matrix-free products.

        A reference would not do: a caller may refill the tensor after the forward
        (``buf.copy_(x_k)``). The copy costs no memory once the backward pass is over, since
        autograd frees its own saved input then; only a tensor the caller keeps is held twice.
        """
        if x.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
            x = x.clone()
        cap.inputs.append(x)
        cap.rows += rows

    def _fold_if_cheaper(self, cap: Capture, distributed: bool) -> None:
        """``"auto"``: switch to the explicit second moment once this step's rows favour it.

        The first micro-batch alone cannot decide: many small micro-batches add up to a step
        whose kept inputs cost more, in memory and metric products, than ``sum x x^T``. The
        fold adds the kept inputs in the order they came, exactly as the explicit backend.
        """
        if (self.backend != "auto" or distributed or not self.supports_explicit
                or not self.explicit_is_cheaper(cap.rows)):
            return
        d = self.num_features
        gram = torch.zeros(d, d, dtype=self.dtype, device=self.weight.device)
        for x in cap.inputs:
            add_gram_upper(gram, x.reshape(-1, d).to(self.dtype))
        cap.gram, cap.inputs, cap.rows, cap.explicit = gram, [], 0, True

    def _captured(self) -> Capture:
        if self.capture is None:
            raise RuntimeError(f"SLNB: no input was captured for {self.name!r} this step")
        return self.capture

    # -- maths ------------------------------------------------------------------------------
    def prepare(self, ridge: float) -> None:
        """Called once per step, after the captures are complete (and all-reduced)."""
        self.ridge = ridge

    def precondition(self, v: Vec, mu: Tensor, inv_denom: Tensor) -> Vec:
        """Apply the diagonal incomplete-Cholesky inverse of the metric."""
        raise NotImplementedError

    def metric(self, v: Vec) -> Vec:
        """``(J^T J / N + ridge I_W) v`` on this step's inputs."""
        raise NotImplementedError

    def _reduce(self, out: list[Tensor]) -> None:
        """Sum matrix-free products over data-parallel ranks (set by the optimizer)."""
        if self.reduce_fn is not None:
            self.reduce_fn(out)


class LinearNeuron(Neuron):
    """``nn.Linear``: ``y = x W^T + b``, weight ``(out, in)``, features on the last axis."""

    kind = "linear"
    features_last = True  # weight (out, in)

    @property
    def row_dims(self) -> tuple[int, ...]:
        return (1,) if self.features_last else (0,)

    @property
    def num_features(self) -> int:
        return self.weight.shape[1 if self.features_last else 0]

    def record(self, x: Tensor, out_positions: int, diagonal_only: bool, distributed: bool) -> None:
        source = x
        x = x.reshape(-1, x.shape[-1])
        cap = self.capture
        if cap is None:
            cap = self.capture = self._new_capture(
                self.choose_explicit(x.shape[0], diagonal_only, distributed)
            )
        xs = x.to(self.dtype)
        cap.sum_x += xs.sum(0)
        cap.count += xs.shape[0]
        cap.n_out += xs.shape[0]
        if cap.gram is not None:
            add_gram_upper(cap.gram, xs)  # its diagonal is sum_x2: see Capture.square_sums
        else:
            cap.sum_x2 += (xs * xs).sum(0)
            if not diagonal_only:
                self._keep(cap, x, source, x.shape[0])
                self._fold_if_cheaper(cap, distributed)

    def prepare(self, ridge: float) -> None:
        super().prepare(ridge)
        cap = self._captured()
        self._sn = cap.sum_x / cap.n_out
        if cap.gram is not None:
            # (X^T X / N + ridge I): one product per metric-vector multiplication
            self._gr = symmetrized(cap.gram) / cap.n_out
            self._gr.diagonal().add_(ridge)

    def precondition(self, v: Vec, mu: Tensor, inv_denom: Tensor) -> Vec:
        w = v[0]
        last = self.features_last
        if len(v) == 1:
            return (w * (inv_denom if last else inv_denom[:, None]),)
        b = v[1]
        if last:  # (out, in): w' = (w - b mu^T) / var, b' = b - w' mu
            w2 = torch.addr(w, b, mu, alpha=-1.0).mul_(inv_denom)
            return (w2, torch.addmv(b, w2, mu, alpha=-1.0))
        w2 = torch.addr(w, mu, b, alpha=-1.0).mul_(inv_denom[:, None])
        return (w2, torch.addmv(b, w2.T, mu, alpha=-1.0))

    def metric(self, v: Vec) -> Vec:
        cap = self._captured()
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
        out = [t / cap.n_out for t in out]
        out[0] = out[0].add_(wr, alpha=self.ridge)
        if not last:
            out[0] = out[0].T
        return tuple(out)


class Conv1DNeuron(LinearNeuron):
    """Hugging Face ``Conv1D`` (GPT-2 family): ``y = x W + b`` with weight stored ``(in, out)``."""

    kind = "conv1d_hf"
    features_last = False  # weight (in, out)


class EmbeddingNeuron(Neuron):
    """``nn.Embedding``: a linear map of a one-hot input, weight ``(vocab, dim)``.

    The input's second moment is the diagonal of token frequencies, so the metric is diagonal
    and exact at the cost of a ``bincount``: ``A(V)[i] = counts[i] / N * V[i]``.
    """

    kind = "embedding"
    supports_matrix_free = False
    row_dims = (0,)  # weight (vocab, dim): an output unit is a column

    @property
    def num_features(self) -> int:
        return self.weight.shape[0]

    def choose_explicit(self, rows: int, diagonal_only: bool, distributed: bool) -> bool:
        return False  # the counts are the whole metric: no gram, no inputs

    def record(self, x: Tensor, out_positions: int, diagonal_only: bool, distributed: bool) -> None:
        cap = self.capture
        if cap is None:
            cap = self.capture = self._new_capture(False)
        idx = x.reshape(-1)
        counts = torch.bincount(idx, minlength=self.num_features).to(self.dtype)
        cap.sum_x += counts
        cap.sum_x2 += counts
        cap.count += idx.numel()
        cap.n_out += idx.numel()

    def prepare(self, ridge: float) -> None:
        super().prepare(ridge)
        cap = self._captured()
        self._diag = (cap.sum_x / cap.n_out + ridge)[:, None]

    def precondition(self, v: Vec, mu: Tensor, inv_denom: Tensor) -> Vec:
        return (v[0] * inv_denom[:, None],)

    def metric(self, v: Vec) -> Vec:
        return (v[0] * self._diag,)


class ConvNeuron(Neuron):
    """``nn.Conv1d/2d/3d`` with any stride, padding, dilation, padding mode and groups.

    Features are input channels; the preconditioner broadcasts each channel's statistics over
    the kernel's taps. The metric is matrix-free: the layer run with the vector as its weights,
    then its weight gradient (``N`` = batch x output positions).
    """

    kind = "conv"
    supports_explicit = False

    @property
    def row_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.weight.dim()))

    @property
    def num_features(self) -> int:
        return self.module.in_channels  # type: ignore[return-value]

    def _grouped(self, t: Tensor) -> Tensor:
        g = self.module.groups  # type: ignore[attr-defined]
        return t.reshape(g, t.shape[0] // g, t.shape[1], -1)

    def record(self, x: Tensor, out_positions: int, diagonal_only: bool, distributed: bool) -> None:
        source = x
        spatial = self.weight.dim() - 2
        if x.dim() == spatial + 1:  # unbatched input
            x = x.unsqueeze(0)
        cap = self.capture
        if cap is None:
            cap = self.capture = self._new_capture(False)
        xs = x.to(self.dtype)
        dims = [0] + list(range(2, xs.dim()))
        cap.sum_x += xs.sum(dims)
        cap.sum_x2 += (xs * xs).sum(dims)
        cap.count += xs.numel() // xs.shape[1]
        cap.n_out += out_positions
        if not diagonal_only:
            self._keep(cap, x, source, 0)  # rows: unused (no explicit conv backend)

    def precondition(self, v: Vec, mu: Tensor, inv_denom: Tensor) -> Vec:
        g = self.module.groups  # type: ignore[attr-defined]
        w = self._grouped(v[0])
        mu4 = mu.reshape(g, 1, -1, 1)
        inv4 = inv_denom.reshape(g, 1, -1, 1)
        if len(v) == 1:
            return ((w * inv4).reshape(v[0].shape),)
        b4 = v[1].reshape(g, -1, 1, 1)
        w2 = (w - mu4 * b4) * inv4
        b2 = v[1] - (w2 * mu4).sum((2, 3)).reshape(-1)
        return (w2.reshape(v[0].shape), b2)

    def metric(self, v: Vec) -> Vec:
        cap = self._captured()
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
        out = [t / cap.n_out for t in out]
        out[0].add_(v[0], alpha=self.ridge)
        return tuple(out)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``, recognised without importing it."""
    cls = type(module)
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__
    )


def neuron_for(
    name: str, module: nn.Module, embeddings: bool, backend: str
) -> Neuron | None:
    """The helper for a module, or ``None`` when SLNB gives it the identity metric."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, Tensor) else None
    if isinstance(module, nn.Linear):
        return LinearNeuron(name, module, weight, bias, backend)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return ConvNeuron(name, module, weight, bias, backend)
    if _is_hf_conv1d(module) and weight.dim() == 2:
        return Conv1DNeuron(name, module, weight, bias, backend)
    if embeddings and isinstance(module, nn.Embedding):
        return EmbeddingNeuron(name, module, weight, None, backend)
    return None


def out_positions(output: Tensor, neuron: Neuron) -> int:
    """Number of output positions of one forward (samples of the metric)."""
    if isinstance(neuron, ConvNeuron):
        spatial = neuron.weight.dim() - 2
        if output.dim() == spatial + 1:
            return math.prod(output.shape[1:])
        return output.shape[0] * math.prod(output.shape[2:])
    return output.numel() // max(output.shape[-1], 1)


__all__ = [
    "BACKENDS",
    "Capture",
    "Conv1DNeuron",
    "ConvNeuron",
    "EmbeddingNeuron",
    "LinearNeuron",
    "Neuron",
    "neuron_for",
    "out_positions",
    "stat_dtype",
]
