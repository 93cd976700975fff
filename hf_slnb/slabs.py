"""Per-parameter state laid out for batched maths: slabs of equal-shape tensors in flat buffers.

Every trainable parameter belongs to one :class:`Slab`: parameters of one (local) shape, dtype,
device and per-group options, stored one after another in flat buffers of their
:class:`Arena` (one arena per device and statistics dtype). A slab's rows are a stack
``(L, *shape)`` that is a *view* of the flat buffer, so a step needs no ``torch.stack`` copies:
whole-arena maths (momentum, Adam's second moment, the skip mask) is one kernel, per-slab maths
(preconditioners, norms, bias corrections that broadcast along the stack axis) one kernel per
slab. ``optimizer.state[p]`` holds views of the buffers, so the standard ``state_dict`` has them;
after a load (which replaces them) :meth:`Arena.adopt` copies them back in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .distributed import is_dtensor, local

#: Whether :meth:`Arena.release` frees the step's scratch on the CPU too. Off: there each new
#: allocation is paid in page faults at its first write (MiniLM's 22.7M parameters: 70 ms per
#: step, 17% of the default preset's step), and host memory is rarely what runs out.
RELEASE_ON_CPU = False


class Slab:
    """``L`` parameters of one local shape: rows ``lo:hi`` of the arena's parameter list."""

    def __init__(self, params: list[Tensor], lo: int, offset: int, key: tuple[Any, ...]) -> None:
        self.params = params
        self.shape = tuple(local(params[0]).shape)
        self.numel = math.prod(self.shape)
        self.lo, self.hi = lo, lo + len(params)
        self.offset, self.key = offset, key
        self.end = offset + self.numel * len(params)
        self.numel_global = math.prod(params[0].shape)
        self.sharded = is_dtensor(params[0])
        self.arena: Arena | None = None
        #: A bank's weights or biases (a layer's), not parameters with the identity metric.
        self.in_bank = key[0] == "bank"

    def stack(self, flat: Tensor) -> Tensor:
        """The slab's rows ``(L, *shape)`` of a persistent flat buffer (a view made once; it
        follows the buffer's storage when :meth:`Arena.release` frees it and
        :meth:`Arena.acquire` allocates it again)."""
        cache = self.__dict__.setdefault("_stacks", {})
        key = (id(flat), flat.dtype)
        if key not in cache:  # the buffer is kept beside its view: its id is never reused
            cache[key] = (flat, flat[self.offset:self.end].view(len(self.params), *self.shape))
        return cache[key][1]

    def rows(self, vec: Tensor, persistent: bool = False) -> Tensor:
        """The slab's entries ``(L,)`` of a per-parameter vector (a view; made once for the
        arena's persistent vectors, ``steps`` and the per-tensor state)."""
        if not persistent:
            return vec[self.lo:self.hi]
        cache = self.__dict__.setdefault("_rows", {})
        key = (vec.data_ptr(), vec.dtype)
        if key not in cache:
            cache[key] = vec[self.lo:self.hi]
        return cache[key]


class Arena:
    """Flat state buffers of the parameters of one device and statistics dtype.

    Attributes:
        slabs: The slabs, in buffer order.
        params: Every parameter, in slab order (parameter ``i`` is row ``i`` of ``steps``).
        buffers: Per-element state (``momentum_buffer``, optionally ``exp_avg_sq``), flat. A
            ``sparse`` key's buffer covers the slabs before the ``directed`` last ones only
            (their parameters keep no such state): it is a prefix of the arena's layout.
        steps: Each parameter's step count ``(P,)`` (float64; ``state[p]["step"]`` is a view).
        metric_sq: The tensor step rule's per-tensor EMA ``(P,)`` (or ``None``).
        betas: Each parameter's momentum ``(P,)`` (float64).
    """

    def __init__(self, slabs: list[list[Tensor]], keys: list[tuple[Any, ...]],
                 betas: list[float], dtype: torch.dtype, device: torch.device,
                 element_keys: Sequence[str], per_tensor_keys: Sequence[str],
                 sparse: Sequence[str] = (), directed: int = 0) -> None:
        self.dtype, self.device = dtype, device
        self.slabs: list[Slab] = []
        self.params: list[Tensor] = []
        offset = 0
        for members, key in zip(slabs, keys):
            slab = Slab(members, len(self.params), offset, key)
            slab.arena = self
            self.slabs.append(slab)
            self.params.extend(members)
            offset = slab.end
        self.numel = offset
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.slab_of = {id(p): s for s in self.slabs for p in s.params}
        #: The slabs laid out last whose parameters keep no ``sparse`` state (weights that
        #: always take their direction, whose Adam moment nothing would read).
        self.directed = frozenset(id(s) for s in self.slabs[-directed:]) if directed \
            else frozenset()
        #: Elements before them: a ``sparse`` buffer's length.
        self.kept = self.slabs[-directed].offset if directed else offset
        self.sparse = frozenset(sparse) if directed else frozenset()
        z = {"dtype": dtype, "device": device}
        self.buffers = {k: torch.zeros(self.kept if k in sparse else offset, **z)
                        for k in element_keys}
        self.grad = torch.zeros(offset, **z)
        self.update = torch.zeros(offset, **z)
        P = len(self.params)
        self.steps = torch.zeros(P, dtype=torch.float64, device=device)
        self.per_tensor = {k: torch.zeros(P, **z) for k in per_tensor_keys}
        self.betas = torch.tensor(betas, dtype=torch.float64, device=device)
        self.beta_values = tuple(betas)
        self.step0 = self.steps[0] if P else self.steps  # a view made once
        #: Every parameter has taken the same steps and has the same momentum: bias corrections
        #: are one scalar (a host fact: cleared by a step that leaves a parameter out, or a
        #: loaded state whose counters differ).
        self.uniform = len(set(betas)) <= 1
        self._views: dict[str, list[Tensor]] = {}
        self._live_key: tuple[int, ...] | None = None
        self.live_elements: Tensor | None = None  # set by each step's context
        self.live_params: Tensor | None = None
        #: Every element is live this step, known on the host (the CPU only: see StepContext).
        self.all_live = False

    def acquire(self) -> None:
        """Allocate the step's scratch, the gradients' copy and the update (uninitialised:
        each step writes them before reading them), if :meth:`release` freed it."""
        for flat in (self.grad, self.update):
            storage = flat.untyped_storage()
            if storage.nbytes() == 0 and flat.numel() > 0:
                storage.resize_(flat.numel() * flat.element_size())

    def release(self) -> None:
        """Free the step's scratch between steps on accelerators, so that it costs no memory
        during the forward and backward passes (as AdamW's temporaries; the caching allocator
        hands it back at no cost). Its views stay valid: they refer to the storage, which
        :meth:`acquire` allocates again. On the CPU it is kept (:data:`RELEASE_ON_CPU`)."""
        if self.device.type == "cpu" and not RELEASE_ON_CPU:
            return
        for flat in (self.grad, self.update):
            flat.untyped_storage().resize_(0)

    def spans(self, flat: Tensor, skip: frozenset[int]) -> list[Tensor]:
        """The flat views of a persistent buffer outside the slabs whose ids are in ``skip``:
        one per maximal run of the other slabs (made once per buffer and ``skip``)."""
        cache = self.__dict__.setdefault("_spans", {})
        key = (id(flat), flat.dtype, skip)
        if key not in cache:
            runs: list[list[int]] = []
            for slab in self.slabs:
                if id(slab) in skip:
                    continue
                if runs and runs[-1][1] == slab.offset:
                    runs[-1][1] = slab.end
                else:
                    runs.append([slab.offset, slab.end])
            cache[key] = (flat, [flat[lo:hi] for lo, hi in runs])  # the buffer kept: its id
        return cache[key][1]  # is never reused

    def identity_tail(self) -> Tensor | None:
        """The gradient scratch of the parameters with the identity metric, laid out in one
        run (after the banks' slabs, before any ``directed`` ones), as one flat view (made
        once)."""
        if not hasattr(self, "_tail"):
            plain = [s for s in self.slabs if not s.in_bank]
            start = plain[0].offset if plain else 0
            end = plain[-1].end if plain else 0
            assert all(s.end <= start or s.offset >= end for s in self.slabs if s.in_bank)
            self._tail = self.grad[start:end] if start < end else None
        return self._tail

    def views(self, name: str) -> list[Tensor]:
        """Per-parameter views (local shapes) of a flat buffer, made once: of a ``sparse``
        buffer, those of the parameters before the ``directed`` slabs (the ones that keep it)."""
        if name not in self._views:
            flat = self.grad if name == "grad" else self.update if name == "update" \
                else self.buffers[name]
            out = []
            for slab in self.slabs:
                if name not in self.sparse or id(slab) not in self.directed:
                    out.extend(slab.stack(flat).unbind())
            self._views[name] = out
        return self._views[name]

    # -- the state dict's entries ----------------------------------------------------------------
    def publish(self, state: Callable[[Tensor], dict[str, Any]]) -> None:
        """Point ``state(p)``'s entries at this arena's views (DTensors for sharded ones); the
        ``directed`` parameters hold no ``sparse`` entry (one a load brought is dropped)."""
        for key in self.buffers:
            views = self.views(key)
            for p, view in zip(self.params, views):
                state(p)[key] = _like(view, p)
            for p in self.params[len(views):]:
                state(p).pop(key, None)
        for i, p in enumerate(self.params):
            state(p)["step"] = self.steps[i]
            for key, vec in self.per_tensor.items():
                state(p)[key] = vec[i]

    def adopt(self, state: Callable[[Tensor], dict[str, Any]]) -> bool:
        """Copy state entries that are not this arena's views (a load replaced them) back in.
        A ``sparse`` entry of a ``directed`` parameter (an older checkpoint's unread Adam
        moment) is not: :meth:`publish` drops it.

        Returns whether anything was copied (then :meth:`publish` re-points the entries).
        """
        copied = False
        before = self.steps.clone()
        for key in self.buffers:
            for p, view in zip(self.params, self.views(key)):
                value = state(p).get(key)
                if value is not None and local(value).data_ptr() != view.data_ptr():
                    view.copy_(local(value).reshape(view.shape))
                    copied = True
        for i, p in enumerate(self.params):
            for key, vec in (("step", self.steps), *self.per_tensor.items()):
                value = state(p).get(key)
                if isinstance(value, Tensor) and not _is_view_of(value, vec, i):
                    vec[i].copy_(value.reshape(()))
                    copied = True
        if copied and not torch.equal(before, self.steps):  # loading: a sync, not in a step
            self.uniform = self.uniform and bool((self.steps == self.steps[0]).all())
        return copied

    # -- masks -------------------------------------------------------------------------------------
    def live(self, ids: frozenset[int]) -> tuple[Tensor | None, Tensor | None]:
        """Per-parameter ``(P,)`` and per-element ``(N,)`` masks of the parameters stepped now.

        ``(None, None)`` when every parameter of the arena has a gradient (the usual case; no
        mask is needed). Built from host facts, once per distinct set, not per step.
        """
        if len(ids) == len(self.params):
            return None, None
        key = tuple(sorted(self.index[i] for i in ids))
        if key != self._live_key:
            flags = [id(p) in ids for p in self.params]
            numels = torch.tensor([s.numel for s in self.slabs for _ in s.params],
                                  device=self.device)
            per = torch.tensor(flags, dtype=torch.bool, device=self.device)
            self._live = (per, per.repeat_interleave(numels, output_size=self.numel))
            self._live_key = key
        return self._live


def _like(view: Tensor, p: Tensor) -> Tensor:
    """``view`` laid out as parameter ``p``: a DTensor sharded like it when ``p`` is one."""
    if not is_dtensor(p):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(view, p.device_mesh, p.placements, shape=p.shape,  # type: ignore[attr-defined]
                              stride=p.stride(), run_check=False)


def _is_view_of(value: Tensor, vec: Tensor, i: int) -> bool:
    return (value.dim() == 0 and value.device == vec.device and value.dtype == vec.dtype
            and value.data_ptr() == vec[i].data_ptr())


__all__ = ["Arena", "Slab"]
