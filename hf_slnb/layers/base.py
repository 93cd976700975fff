"""What every layer helper shares: captures, banks of same-shape layers, the registry.

A *neuron* is a module linear in its parameters. Its helper (one small subclass of
:class:`Neuron` per layer type, registered with :func:`register_layer`) knows the layer's feature
axis, how many output positions a forward has, how its input becomes per-feature sums, how the
diagonal preconditioner acts on a stack of its gradients and how to multiply by the metric
``J^T J / N``. Vectors are tuples ``(weight,)`` or ``(weight, bias)`` in the parameters' layouts.

Layers of one type, shape and dtype share a :class:`Bank`: their captured sums and their feature
statistics are rows of stacked tensors, so that one kernel serves the whole bank at each step
(and a data-parallel reduction is one collective over a few large tensors).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import Vec

GRAM_BLOCK = 256


_STAT_DTYPES: dict[torch.dtype, torch.dtype] = {}


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or the parameter's dtype, whichever is wider (cached: no dispatch per call)."""
    out = _STAT_DTYPES.get(dtype)
    if out is None:
        out = _STAT_DTYPES[dtype] = torch.promote_types(dtype, torch.float32)
    return out


def add_gram_upper(gram: Tensor, x: Tensor, block: int = GRAM_BLOCK) -> None:
    """``gram += x^T x`` on the diagonal and upper blocks only (symmetry saves up to half)."""
    d = x.shape[1]
    if d <= block:
        gram.addmm_(x.T, x)
        return
    for i in range(0, d, block):
        gram[i : i + block, i:].addmm_(x[:, i : i + block].T, x[:, i:])


#: Elements per chunk of :func:`add_column_sums`'s squares on the CPU (4 MB in float32).
SQUARE_CHUNK = 1 << 20


def square_sums(x: Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``Σ x²`` over ``dims`` of a CPU input whose features are on its last axis, in ``dtype``:
    the squares summed directly, in chunks of :data:`SQUARE_CHUNK` elements for a larger input
    so that the temporary stays bounded. (A squared column norm reduces across rows 7-16x slower
    on the CPU: ``(2048, 1024)`` in 16 ms against 1 ms.) The eager and the compiled captures
    both call it, so they add the same numbers."""
    if x.numel() <= SQUARE_CHUNK:
        x = x.to(dtype)
        return torch.sum(x * x, dims)
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, SQUARE_CHUNK // max(x.shape[-1], 1))
    out = torch.zeros(flat.shape[1], dtype=dtype, device=x.device)  # 0 + the first chunk: exact
    for i in range(0, flat.shape[0], step):
        block = flat[i : i + step].to(dtype)
        out.add_(torch.sum(block * block, 0))
    return out


def add_column_sums(sum_x: Tensor, sum_x2: Tensor, x: Tensor) -> Tensor:
    """``sum_x += Σ x`` and ``sum_x2 += Σ x²`` over every position of an input ``(..., d)``, in
    the sums' dtype; returns this input's ``Σ x``.

    On accelerators the squares' sum is a squared column norm: four kernels in all, no
    temporary of the input's size. On the CPU, where that norm is slow, :func:`square_sums`
    (five ops for most inputs)."""
    return _add_sums(sum_x, sum_x2, column_sums(x, sum_x.dtype))


def column_sums(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool]:
    """``(Σ x, s, squared)`` over every position of ``x`` ``(..., d)`` in ``dtype``: ``s`` is
    ``Σ x²`` (``squared``, the CPU: :func:`square_sums`) or the column norm whose square it is
    (accelerators). :func:`add_column_sums` adds them."""
    dims = tuple(range(x.dim() - 1))
    total = torch.sum(x, dims, dtype=dtype)
    if x.device.type != "cpu":
        return total, torch.linalg.vector_norm(x, 2, dims, dtype=dtype), False
    return total, square_sums(x, dims, dtype), True


def _add_sums(sum_x: Tensor, sum_x2: Tensor, sums: tuple[Tensor, Tensor, bool]) -> Tensor:
    total, second, squared = sums
    sum_x.add_(total)
    if squared:
        sum_x2.add_(second)
    else:
        sum_x2.addcmul_(second, second)
    return total


def row_stride(n: int, rows: int, seq: int) -> int:
    """The stride that keeps at most ``rows`` of ``n`` positions: the smallest ``k >=
    ceil(n / rows)`` coprime to the sequence length ``seq``, so that the kept rows of a
    ``(batch, seq)`` input visit every position of a sequence alike. A stride dividing ``seq``
    would keep the same positions of every sequence, and over-weight what is special about them
    (the first token's outlier features) ``k``-fold."""
    k = -(-n // rows)
    while math.gcd(k, seq) != 1:
        k += 1
    return k


class _LastInput(threading.local):
    """What was computed from the last input (a hook's), so that layers reading one tensor (a
    Llama's or BERT's q/k/v, a Llama's gate/up) pay for it once: their capture hooks fire one
    after another in the backward pass. Keyed by the input's identity and version through a weak
    reference (a freed input never matches, and is never kept alive), and by ``extra``."""

    def __init__(self) -> None:
        self._key: tuple[Any, int, Any] | None = None
        self._value: Any = None

    def of(self, x: Tensor, extra: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its value for the same ``x`` and ``extra`` as last time."""
        key = self._key
        if key is None or key[0]() is not x or key[1] != x._version or key[2] != extra:
            self._value = compute()
            self._key = (weakref.ref(x), x._version, extra)
        return self._value


class SharedGram(_LastInput):
    """The last input's ``x^T x`` (upper blocks): one product per input (:class:`_LastInput`)."""

    def add_to(self, gram: Tensor, x: Tensor, d: int) -> None:
        """``gram += x^T x`` (upper blocks: :func:`input_gram`), reusing the product of the same
        input."""
        gram.add_(self.of(x, gram.dtype, lambda: input_gram(x, d, gram.dtype)))


class SharedSums(_LastInput):
    """The last input's column sums (:func:`column_sums`): one reduction per input."""

    def add_to(self, sum_x: Tensor, sum_x2: Tensor, x: Tensor) -> Tensor:
        """:func:`add_column_sums`, reusing the sums of the same input."""
        return _add_sums(sum_x, sum_x2,
                         self.of(x, sum_x.dtype, lambda: column_sums(x, sum_x.dtype)))


def input_gram(x: Tensor, d: int, dtype: torch.dtype, blocks: int = 1) -> Tensor:
    """One input's ``x^T x`` ``(d, d)`` over all its positions, in ``dtype`` (upper blocks:
    :func:`add_gram_upper`). With ``blocks`` > 1, only the diagonal blocks ``(blocks, b, b)``
    of :func:`block_shape`'s split (the last one's padding zero): what a layer whitened in
    blocks keeps."""
    flat = x.reshape(-1, d).to(dtype)
    prod, tiles = _gram_tiles(d, blocks, dtype, x.device)
    for tile, span in tiles:
        add_gram_upper(tile, flat[:, span])
    return prod


def _gram_tiles(d: int, blocks: int, dtype: torch.dtype, device: torch.device
                ) -> tuple[Tensor, list[tuple[Tensor, slice]]]:
    """A zero ``x^T x``, ``(d, d)`` or its diagonal blocks ``(blocks, b, b)`` (the last one's
    padding left zero), and each tile to fill with the features it spans."""
    b = -(-d // blocks)
    prod = torch.zeros((d, d) if blocks == 1 else (blocks, b, b), dtype=dtype, device=device)
    tiles = [(prod if blocks == 1 else prod[k, : min(b, d - lo), : min(b, d - lo)],
              slice(lo, lo + b)) for k, lo in enumerate(range(0, d, b))]
    return prod, tiles


def sampled_moments(x: Tensor, d: int, rows: int, dtype: torch.dtype,
                    blocks: int = 1) -> tuple[Tensor, Tensor]:
    """``(x^T x, Σ x)`` of one input (``blocks`` as :func:`input_gram`): over all its
    positions, or with ``rows`` > 0 and more positions than that estimated from every ``k``-th
    one (:func:`row_stride`) as ``n (S + m mᵀ)`` and ``n m``, ``S`` and ``m`` the kept rows'
    covariance about their own mean and that mean. The centred covariance these give, ``x^T x
    / n - (Σ x / n)(Σ x / n)ᵀ``, is ``S``, and nothing reads the rows it skips: the captures of
    a bank that keeps its ``x xᵀ`` (:meth:`Bank.keep_grams`) read a ``1/k`` stride of a large
    input, not all of it twice more for column sums and squares (the 0.9M Llama's captures:
    8.3 ms per step instead of 14.6, one thread). Rescaling the kept rows' raw ``x^T x``
    instead of centring them would lose the covariance's digits in float32 wherever the inputs
    have a large mean (GPT-2's), and its inverse root would then blow up."""
    flat = x.reshape(-1, d).to(dtype)
    n = int(flat.shape[0])  # a concrete size under torch.compile too (the stride needs one)
    if not 0 < rows < n:
        return input_gram(x, d, dtype, blocks), flat.sum(0)
    kept = flat[:: row_stride(n, rows, int(x.shape[-2]) if x.dim() > 2 else 1)]
    mean = kept.mean(0)
    kept = kept - mean
    prod, tiles = _gram_tiles(d, blocks, dtype, x.device)
    for tile, span in tiles:
        add_gram_upper(tile, kept[:, span])
        tile.addr_(mean[span], mean[span], beta=n / kept.shape[0], alpha=n)
    return prod, mean.mul_(n)


#: One per thread (a backward pass runs its hooks on one thread per device).
SHARED_GRAM = SharedGram()
#: The column sums' counterpart (one per thread as well).
SHARED_SUMS = SharedSums()


def gram_upper_blocks(gram: Tensor, block: int = GRAM_BLOCK) -> list[Tensor]:
    """The views of a gram that :func:`add_gram_upper` fills (all a reduction needs to sum)."""
    d = gram.shape[-1]
    if d <= block:
        return [gram]
    return [gram[..., i : i + block, i:] for i in range(0, d, block)]


def symmetrized(gram: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """A full symmetric copy of a gram accumulated by :func:`add_gram_upper`
    (:func:`symmetrize_` of a clone)."""
    return symmetrize_(gram.clone(), block)


def symmetrize_(gram: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """In place, for one gram ``(d, d)`` or a stack ``(..., d, d)`` accumulated by
    :func:`add_gram_upper`: each upper block copied transposed below the diagonal blocks, one op
    per block pair whatever the stack's size. Tile by tile, because adding a whole transposed
    matrix reads across rows (on the CPU 4-9x slower: a (1536, 1536) gram in 35 ms against 4
    ms)."""
    d = gram.shape[-1]
    for i in range(0, d, block):
        for j in range(i + block, d, block):
            gram[..., j : j + block, i : i + block] = gram[..., i : i + block, j : j + block].mT
    return gram


@dataclass
class Capture:
    """What a neuron saw since the last step (its sums are rows of its bank). Never saved.

    Attributes:
        sum_x: Sum of the input features over every input position ``(d,)`` (a bank row).
        sum_x2: Sum of their squares ``(d,)`` (a bank row).
        count: Input positions (a Python number: shapes are known on the host).
        n_out: Output positions ``N`` of the metric (a Python number).
        gram: Explicit backend: ``sum x x^T`` over input positions (upper blocks), else ``None``.
        inputs: Matrix-free backend: private copies of the inputs.
        explicit: Which backend this step uses (``"auto"`` may switch once rows favour it).
        rows: Rows of the kept inputs.
        task: The backward pass that last added to this capture (see ``hooks.CaptureHook``).
    """

    sum_x: Tensor
    sum_x2: Tensor
    count: float = 0.0
    n_out: float = 0.0
    gram: Tensor | None = None
    inputs: list[Tensor] = field(default_factory=list)
    explicit: bool = False
    rows: int = 0
    task: int = -1


class Bank:
    """Same-type, same-shape layers whose captures and statistics are rows of stacked tensors.

    Attributes:
        neurons: The layers, one row each.
        sums: This step's captured sums ``(L, 2, d)``: of the features and of their squares
            (``sum_x``, ``sum_x2`` are views), zeroed after every step.
        stats: Feature-mean and mean-square EMAs ``(L, 2, d)`` (raw, without bias correction;
            ``mu``, ``nu`` are views, and ``optimizer.state[weight]["mu"]`` a view of a row).
        stat_step: Steps in which each layer saw input ``(L, 1, 1)`` (float64, on the device).
        decays: The EMA decays ``(1, 2, 1)`` (float64): ``mean_decay``, ``sq_mean_decay``.
    """

    def __init__(self, neurons: list[Neuron], dtype: torch.dtype, device: torch.device,
                 decays: tuple[float, float] = (0.9, 0.999)) -> None:
        self.neurons = neurons
        self.dtype, self.device = dtype, device
        L, d = len(neurons), neurons[0].num_features
        self.sums = torch.zeros(L, 2, d, dtype=dtype, device=device)
        self.stats = torch.zeros(L, 2, d, dtype=dtype, device=device)
        self.sum_x, self.sum_x2 = self.sums.unbind(1)
        #: Input and output positions of captures made inside ``torch.compile`` (device
        #: tensors: no Python state changes in a compiled graph); the step adds them in.
        self.compiled_counts = torch.zeros(L, 2, dtype=dtype, device=device)
        self.compiled = False
        self.mu, self.nu = self.stats.unbind(1)
        self.stat_step = torch.zeros(L, 1, 1, dtype=torch.float64, device=device)
        self.decays = torch.tensor(decays, dtype=torch.float64, device=device).reshape(1, 2, 1)
        self.weights_ema = (1.0 - self.decays).to(dtype)
        self.has_bias = neurons[0].bias is not None
        #: ``(L,)`` all true: the mask of a step in which every layer takes its direction.
        self.all_layers = torch.ones(L, dtype=torch.bool, device=device)
        self.layout: Any = None  # hf_slnb.sharding: set by the optimizer
        self.sol: tuple[Tensor, ...] | None = None  # PCG warm starts (w, b) stacks
        #: This step's ``x^T x`` sums ``(L, d, d)`` (upper blocks), for directions that need
        #: every step's (see :meth:`keep_grams`); ``None`` otherwise (each capture then holds
        #: its own). Zeroed after every step.
        self.grams: Tensor | None = None
        rows_x, rows_x2 = self.sum_x.unbind(), self.sum_x2.unbind()
        mus, nus, steps = self.mu.unbind(), self.nu.unbind(), self.stat_step[:, 0, 0].unbind()
        self.state_rows = list(zip(mus, nus, steps))  # views made once, for optimizer.state
        for i, n in enumerate(neurons):
            n.bank, n.row = self, i
            n.rows = (rows_x[i], rows_x2[i])  # views made once: a capture costs no view op
            n.bank_gram = None  # until the bank keeps its grams (keep_grams)
            n.count_row = self.compiled_counts[i]

    def keep_grams(self, blocks: int = 1) -> None:
        """Hold the layers' ``x^T x`` sums in one bank tensor ``(L, blocks, b, b)``: captures add
        into its rows (eager ones and those made inside ``torch.compile`` alike; ``(d, d)``
        rows for one block, else the diagonal blocks) and the step reads them as a stack. Such
        a bank's statistics all come from that ``x xᵀ``: its captures take the column sums from
        the rows it keeps (:func:`sampled_moments`), the step its squares from its diagonal
        (:meth:`squares_from_grams`)."""
        if self.grams is None or self.grams.shape[1] != blocks:
            L, d = len(self.neurons), self.neurons[0].num_features
            b = -(-d // blocks)
            self.grams = torch.zeros(L, blocks, b, b, dtype=self.dtype, device=self.device)
        for n, row in zip(self.neurons, self.grams.unbind()):
            n.bank_gram = row[0] if blocks == 1 else row
            n.gram_blocks = blocks

    def squares_from_grams(self) -> None:
        """``sum_x2`` from the diagonal of this step's ``x^T x`` sums (:meth:`keep_grams`: its
        captures add no squares): one copy for the bank."""
        diag = self.grams.diagonal(dim1=-2, dim2=-1).flatten(1)  # (L, blocks * b), padded
        self.sum_x2.copy_(diag[:, : self.sum_x2.shape[1]])

    def all_captured(self) -> bool:
        """Whether every layer of the bank saw input this step (a host fact)."""
        return all(n.captured for n in self.neurons)

    @property
    def weights(self) -> list[Tensor]:
        return [n.weight for n in self.neurons]

    @property
    def biases(self) -> list[Tensor]:
        return [n.bias for n in self.neurons if n.bias is not None]

    def solutions(self, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The stacked PCG warm starts (zeros before the first solve), shaped like ``like``."""
        if self.sol is None or len(self.sol) != len(like) or any(
                s.shape != t.shape or s.dtype != t.dtype for s, t in zip(self.sol, like)):
            self.sol = tuple(torch.zeros_like(t) for t in like)
        return self.sol

    def keep_solutions(self, h: tuple[Tensor, ...], mask: Tensor) -> None:
        """Store ``h`` as the next warm start of the layers in ``mask`` (the rest keep theirs)."""
        for s, t in zip(self.solutions(h), h):
            torch.where(mask.reshape((-1,) + (1,) * (t.dim() - 1)), t, s, out=s)

    def counts(self) -> tuple[list[float], list[float]]:
        """Input and output positions of each layer this step (host numbers)."""
        caps = [n.capture for n in self.neurons]
        return ([0.0 if c is None else c.count for c in caps],
                [0.0 if c is None else c.n_out for c in caps])


class Neuron:
    """Base helper: bookkeeping shared by every layer type.

    Class attributes a helper sets:
        kind: Its name in messages and diagnostics.
        feature_axis: The weight's axis of input features (1 for ``(out, in, *taps)``, 0 for
            ``(in, out)`` and embeddings ``(vocab, dim)``); dim-0 shards (FSDP2) are output rows
            when it is 1 and input features when it is 0.
        row_dims: Axes of the weight that one output unit's row spans (per-row step sizes).
        supports_explicit / supports_matrix_free: The metric backends it has.
    """

    kind = "neuron"
    feature_axis = 1
    one_hot = False  # an embedding: its squared features are the features (no sum_x2 kept)
    gram_rows = 0  # positions per input that enter x^T x (0: all; cov_rows for whitened_orth)
    gram_blocks = 1  # diagonal blocks of x^T x kept (max_block for whitened_orth: input_gram)
    needs_moments = False  # whether its capture keeps x^T x (set by the optimizer's binding)
    wanted = True  # whether the coming step reads its input (else its hook captures nothing)
    supports_explicit = True
    supports_matrix_free = True

    def __init__(self, name: str, module: nn.Module, weight: Tensor, bias: Tensor | None,
                 backend: str) -> None:
        self.name, self.module, self.weight, self.bias = name, module, weight, bias
        self.backend = backend
        self.capture: Capture | None = None
        #: A training forward ran inside ``torch.compile`` since the last step (its sums go to
        #: the bank by a tensor-only backward hook: see :meth:`capture_compiled`).
        self.compiled_seen = False
        self.bank: Bank | None = None
        self.row = 0
        #: Its row of the bank's ``x^T x`` sums when the bank keeps them (:meth:`Bank.keep_grams`).
        self.bank_gram: Tensor | None = None
        self.cg_iters_hint = 2
        self.ridge = 0.0
        self.reduce_fn: Callable[[list[Tensor]], None] | None = None
        #: Rebuilds the banks when the weight changed dtype or device (set by the optimizer).
        self.rebank: Callable[[], None] | None = None
        #: The slot of a head fed from its backbone's hidden states (see ``hooks``), weakly.
        self.pending_head: Callable[[], object] | None = None

    @property
    def row_dims(self) -> tuple[int, ...]:
        return (self.feature_axis,)  # one output unit's weights span the input features

    @property
    def dtype(self) -> torch.dtype:
        """The statistics' dtype, followed from the weight (``model.double()`` may change it)."""
        return stat_dtype(self.weight.dtype)

    @property
    def num_features(self) -> int:
        return self.weight.shape[self.feature_axis]

    def bank_key(self) -> tuple[Any, ...]:
        """Layers with equal keys share a bank (and one batched preconditioner)."""
        return (type(self), tuple(self.weight.shape), self.bias is not None, self.dtype,
                self.weight.device)

    # -- capture ------------------------------------------------------------------------------
    def open_capture(self, explicit: bool) -> Capture:
        """This step's capture (its sums are the bank's rows), created on the first input."""
        bank = self.bank
        if bank is None or bank.dtype != self.dtype or bank.device != self.weight.device:
            if self.rebank is not None:
                self.rebank()
            bank = self.bank
        if self.capture is None:
            assert bank is not None
            d = self.num_features
            gram = None
            if explicit:
                gram = (self.bank_gram if self.bank_gram is not None else
                        torch.zeros(d, d, dtype=self.dtype, device=self.weight.device))
            self.capture = Capture(*self.rows, explicit=explicit, gram=gram)
        return self.capture

    @property
    def captured(self) -> bool:
        """Whether this layer saw input since the last step (a host fact)."""
        return self.capture is not None or self.compiled_seen

    def drop_capture(self) -> None:
        """Forget what was captured since the last step (its bank rows are zeroed)."""
        if self.captured:
            self.bank.sums[self.row].zero_()  # type: ignore[union-attr]
            if self.bank_gram is not None:
                self.bank_gram.zero_()
            if self.compiled_seen:
                self.count_row.zero_()
            self.capture = None
            self.compiled_seen = False

    @property
    def compiles(self) -> bool:
        """Whether its captures can run inside ``torch.compile`` (:meth:`capture_compiled`): the
        diagonal statistics, and the ``x^T x`` where the bank keeps its layers' sums."""
        return not self.needs_moments or self.bank_gram is not None

    def capture_compiled(self, x: Tensor, output: Tensor) -> Tensor:
        """Inside ``torch.compile``: reduce the input in the forward (traced into the graph) and
        add the sums in a backward hook made of tensor ops only, so that Dynamo keeps one
        graph: the diagonal statistics, and where the bank keeps them (:meth:`Bank.keep_grams`)
        the ``x^T x`` of the input, summed in that backward; counts are device tensors."""
        bank = self.bank
        assert bank is not None
        total = second = gram = None
        squared = False
        if self.bank_gram is not None:  # every sum from the kept rows, in the backward
            gram = (x.detach(), self.bank_gram, self.gram_rows, self.gram_blocks)
        else:
            total, second, squared = self.reduce_input(x)
        n_in, n_out = self.positions(x, output)
        pair = torch.tensor([float(n_in), float(n_out)], dtype=self.dtype, device=x.device)
        self.compiled_seen = True
        bank.compiled = True
        return _CompiledCapture.apply(output, total, second, squared, pair, self.rows,
                                      self.count_row, gram)

    def reduce_input(self, x: Tensor) -> tuple[Tensor, Tensor | None, bool]:
        """The sum of one input's features over its positions, under ``no_grad``, and what the
        commit needs for their squares' sum: on the CPU the input itself (``True``: the commit,
        in the backward, sums its squares with :func:`square_sums`, as the eager capture does;
        summing them in the compiled forward lost one of two forwards' captures under
        ``aot_eager``), elsewhere their norm, whose square the commit adds (``False``)."""
        with torch.no_grad():
            if x.dim() == 1:
                x = x[None]
            dims, dt = tuple(range(x.dim() - 1)), self.dtype
            total = torch.sum(x, dims, dtype=dt)
            if x.device.type == "cpu":
                return total, x.detach(), True
            return total, torch.linalg.vector_norm(x, 2, dims, dtype=dt), False

    def positions(self, x: Tensor, output: Tensor) -> tuple[int, int]:
        rows = x.numel() // max(x.shape[-1], 1)
        return rows, self.out_positions(output)

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

    def out_positions(self, output: Tensor) -> int:
        """Output positions of one forward (samples of the metric)."""
        return output.numel() // max(output.shape[-1], 1)

    def _keep(self, cap: Capture, x: Tensor, rows: int) -> None:
        """Keep a private copy of an input for the matrix-free products (a caller may refill
        its tensor after the forward; autograd frees its own saved input after backward)."""
        cap.inputs.append(x.clone())
        cap.rows += rows

    def _fold_if_cheaper(self, cap: Capture, distributed: bool) -> None:
        """``"auto"``: switch to the explicit second moment once this step's rows favour it."""
        if (self.backend != "auto" or distributed or not self.supports_explicit
                or not self.explicit_is_cheaper(cap.rows)):
            return
        d = self.num_features
        gram = torch.zeros(d, d, dtype=self.dtype, device=self.weight.device)
        for x in cap.inputs:
            add_gram_upper(gram, x.reshape(-1, d).to(self.dtype))
        cap.gram, cap.inputs, cap.rows, cap.explicit = gram, [], 0, True

    def reduce_tensors(self) -> list[Tensor]:
        """What a data-parallel reduction sums besides the bank rows (the explicit gram)."""
        cap = self.capture
        if cap is not None and cap.gram is not None:
            return gram_upper_blocks(cap.gram)
        if self.compiled_seen and self.bank_gram is not None:
            return gram_upper_blocks(self.bank_gram)
        return []

    # -- maths ----------------------------------------------------------------------------------
    def prepare(self, ridge: float, n_out: Tensor) -> None:
        """Called once per step before metric products, with the (reduced) output positions."""
        self.ridge = ridge
        self.n_out = n_out

    def precondition_stacked(self, v: Vec, mu: Tensor, inv_denom: Tensor) -> Vec:
        """The preconditioner of ``L`` layers of this type and shape at once (stacked)."""
        raise NotImplementedError

    def metric(self, v: Vec) -> Vec:
        """``(J^T J / N + ridge I_W) v`` on this step's inputs."""
        raise NotImplementedError

    def stacked_metric(self, bank: Bank, stats: Any, ridge: Any
                       ) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None:
        """The metric of the whole bank as one batched product, or ``None`` (then each layer
        applies its own :meth:`metric`)."""
        return None

    def _reduce(self, out: list[Tensor]) -> None:
        if self.reduce_fn is not None:
            self.reduce_fn(out)


class _CompiledCapture(torch.autograd.Function):
    """The layer's output, unchanged (a view); its backward adds the forward's reductions into
    the layer's bank rows, or where the bank keeps its ``x^T x`` the input's
    :func:`sampled_moments`, as the eager capture adds them. They travel as ``ctx`` attributes, not saved tensors,
    so no version check trips when the rows of one stack change between a forward and its
    backward."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, total: Tensor | None, second: Tensor | None, squared: bool,
                pair: Tensor, sums: tuple[Tensor, Tensor], counts: Tensor,
                gram: tuple[Tensor, Tensor, int, int] | None = None) -> Tensor:
        ctx.parts = (total, second, squared, pair, sums, counts, gram)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        total, second, squared, pair, sums, counts, gram = ctx.parts
        with torch.no_grad():
            if gram is not None:  # Bank.keep_grams: as the eager capture adds them
                x, target, rows, blocks = gram
                prod, total = sampled_moments(x, x.shape[-1], rows, target.dtype, blocks)
                target.add_(prod)
                sums[0].add_(total)
            else:
                sums[0].add_(total)
                if second is not None and squared:
                    sums[1].add_(square_sums(second, tuple(range(second.dim() - 1)),
                                             sums[1].dtype))
                elif second is not None:
                    sums[1].addcmul_(second, second)
            counts.add_(pair)
        return grad, None, None, None, None, None, None, None


#: Layer helpers in the order they are tried: ``(accepts(module, embeddings), helper class)``.
LAYER_TYPES: list[tuple[Callable[[nn.Module, bool], bool], type[Neuron]]] = []


def register_layer(accepts: Callable[[nn.Module, bool], bool]) -> Callable[[type[Neuron]],
                                                                          type[Neuron]]:
    """Class decorator: the helper handles modules for which ``accepts(module, embeddings)``."""
    def add(cls: type[Neuron]) -> type[Neuron]:
        LAYER_TYPES.append((accepts, cls))
        return cls
    return add


def neuron_for(name: str, module: nn.Module, embeddings: bool, backend: str) -> Neuron | None:
    """The helper for a module, or ``None`` when SLNB gives it the identity metric."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, Tensor) else None
    for accepts, cls in LAYER_TYPES:
        if accepts(module, embeddings):
            return cls(name, module, weight, bias, backend)
    return None
