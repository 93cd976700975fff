"""Capture hooks: how SLNB sees each layer's inputs without owning the model.

Every hooked module holds one :class:`CaptureHook`: a small callable object that refers to its
optimizer and neuron only weakly, so a discarded optimizer is freed (its hooks then remove
themselves) and a model never keeps an optimizer alive. A forward in training mode with
gradients enabled leaves a :class:`_Pending` slot on the layer's output; the slot holds the input
until the gradient reaches that output, commits it to the neuron's capture and empties itself, so
a loss kept after ``backward()`` keeps nothing of SLNB but an empty slot. Copies and pickles of a
model carry the hooks as inert objects: a copied model is never wired to the old optimizer, and
an inert hook removes itself the first time its module runs.

A language-model head applied functionally (TRL's fused log-probabilities multiply the last hidden
state by ``lm_head.weight`` without calling the module) is fed from a second hook, on the module
that produces the final hidden states (``model.base_model``): that hook's slot is cancelled as
soon as the head module itself runs in the same forward, so a head is never counted twice.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import LinearNeuron, Neuron

if TYPE_CHECKING:
    from .optimizer import SLNB

#: ``source`` of a hook on the layer itself: its input is the neuron's input.
INPUT = "input"
#: ``source`` of a hook on a language model's backbone: its last hidden state is the head's input.
HIDDEN = "hidden"


def _is_compiling() -> bool:
    """Whether Dynamo is tracing this call (``torch.compile``)."""
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


def _graph_task() -> int:
    """An id of the running backward pass (``-1`` outside one, or if torch cannot tell)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task() if task is not None else -1


class _Pending:
    """One forward's input, waiting for the gradient of the layer's output (a tensor hook)."""

    __slots__ = ("__weakref__", "hook", "n_out", "x")

    def __init__(self, hook: CaptureHook, x: Tensor, n_out: int) -> None:
        self.hook = hook
        self.x: Tensor | None = x
        self.n_out = n_out

    def __call__(self, grad: Tensor) -> None:
        # Committed only when a gradient flows back: no_grad/eval passes and the forward of a
        # checkpointed segment that is recomputed count exactly once. Emptied at once, so that
        # a graph kept alive after backward (a stored loss) holds no input.
        x, self.x = self.x, None
        if x is not None:
            self.hook.commit(x, self.n_out)


class CaptureHook:
    """Forward hook of one neuron's module (or, for a functional head, of the backbone).

    Args:
        optimizer: The SLNB optimizer that owns the neuron (held weakly).
        neuron: The neuron whose capture this hook fills (held weakly).
        source: :data:`INPUT` (the module's own input) or :data:`HIDDEN` (the final hidden state
            of a language-model backbone, for a head used functionally).
    """

    def __init__(self, optimizer: SLNB | None, neuron: Neuron | None, source: str = INPUT) -> None:
        self._optimizer = None if optimizer is None else weakref.ref(optimizer)
        self._neuron = None if neuron is None else weakref.ref(neuron)
        self.source = source
        self.active = optimizer is not None

    @property
    def optimizer(self) -> SLNB | None:
        """The owning optimizer, or ``None`` when it is gone or the hook is inert."""
        return None if self._optimizer is None else self._optimizer()

    def _live(self) -> tuple[SLNB, Neuron] | None:
        if not self.active or self._optimizer is None or self._neuron is None:
            return None
        opt, neuron = self._optimizer(), self._neuron()
        if opt is None or neuron is None:
            return None
        return opt, neuron

    def __call__(self, module: nn.Module, args: tuple[Any, ...], *rest: Any) -> Any:
        # Registered with_kwargs: rest = (kwargs, output); an unpickled copy may be called
        # without kwargs, so accept both.
        live = self._live()
        if live is None:
            unhook(module, self)  # a dead optimizer's or a copy's hook: leave no trace
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        neuron = live[1]
        kwargs = rest[0] if len(rest) == 2 else {}
        output = rest[-1] if rest else None
        compiling = _is_compiling()
        if not (neuron.wanted or compiling):  # the coming step reads none of its input (a
            return  # compiled graph captures anyway: it must not depend on the step)
        if self.source == HIDDEN:
            if not compiling:  # under torch.compile a functional head is not fed (documented)
                self._capture_hidden(neuron, output)
            return
        if compiling and neuron.compiles:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, Tensor) and isinstance(output, Tensor) and output.requires_grad:
                return neuron.capture_compiled(x, output)  # the output, through the capture
            return None
        pending_head = neuron.pending_head() if neuron.pending_head is not None else None
        if pending_head is not None:  # the head ran as a module: its own input counts
            pending_head.x = None
            neuron.pending_head = None
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, Tensor):
            return
        output.register_hook(_Pending(self, x, neuron.out_positions(output)))  # no detach op: the
        # backward hook runs without grad mode and the slot is emptied when it fires

    def _capture_hidden(self, neuron: Neuron, output: Any) -> None:
        # Only a named last_hidden_state (what TRL's fused head reads): a wrapper's tuple or
        # logits must never pass for the head's input.
        hidden = getattr(output, "last_hidden_state", None)
        if not (isinstance(hidden, Tensor) and hidden.requires_grad and hidden.dim() >= 2):
            return
        if hidden.shape[-1] != neuron.num_features:
            return
        pending = _Pending(self, hidden.detach(), hidden.numel() // hidden.shape[-1])
        neuron.pending_head = weakref.ref(pending)  # the graph owns the slot, not the neuron
        hidden.register_hook(pending)

    def commit(self, x: Tensor, n_out: int) -> None:
        """Add one forward's input to the neuron's capture (from the backward pass)."""
        live = self._live()
        if live is None:
            return
        opt, neuron = live
        task = _graph_task()
        cap = neuron.capture
        # The module's weight, not the neuron's: Accelerate swaps in FSDP2's sharded parameters
        # after the optimizer is built, and the neuron follows them only at its next step.
        weight = getattr(neuron.module, "weight", None)
        weight = weight if isinstance(weight, Tensor) else neuron.weight
        if (cap is not None and cap.task != task and weight.grad is None
                and not _is_dtensor(weight)):
            # The gradients were set to None since this capture was made (model.zero_grad()
            # after a step that GradScaler skipped, or a discarded batch): start afresh.
            neuron.drop_capture()
        neuron.record(x, n_out, not neuron.needs_moments, opt._world_size() > 1)
        if neuron.capture is not None:
            neuron.capture.task = task

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Pickles and deep copies of a model carry inert hooks: never wired to this optimizer.
        return (_inert_hook, ())


def _inert_hook() -> CaptureHook:
    """What a pickled or copied :class:`CaptureHook` becomes (removes itself when called)."""
    return CaptureHook(None, None)


def _is_dtensor(t: Tensor) -> bool:
    from .distributed import is_dtensor

    return is_dtensor(t)


def hooks_on(module: nn.Module) -> list[CaptureHook]:
    """The SLNB capture hooks registered on a module (live or not)."""
    return [h for h in module._forward_hooks.values() if isinstance(h, CaptureHook)]


def unhook(module: nn.Module, hook: CaptureHook) -> None:
    """Remove ``hook`` from ``module``'s forward hooks (and the flags torch keeps beside them)."""
    for key in [k for k, h in module._forward_hooks.items() if h is hook]:
        module._forward_hooks.pop(key, None)
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)


def head_sources(model: nn.Module, neurons: Iterable[Neuron]) -> list[tuple[Neuron, nn.Module]]:
    """``(head neuron, backbone)`` for each language-model head whose input can come from its
    backbone's last hidden state (Hugging Face models: ``get_output_embeddings`` and
    ``base_model``)."""
    by_module = {id(n.module): n for n in neurons
                 if isinstance(n, LinearNeuron) and n.features_last}
    out: dict[int, tuple[Neuron, nn.Module]] = {}
    for module in model.modules():  # outer modules first: a wrapper's entry is replaced
        get_head = getattr(module, "get_output_embeddings", None)
        if not callable(get_head):
            continue
        try:
            head = get_head()
        except (AttributeError, NotImplementedError):
            continue
        backbone = getattr(module, "base_model", None)
        neuron = by_module.get(id(head)) if isinstance(head, nn.Module) else None
        if neuron is None or not isinstance(backbone, nn.Module) or backbone is module:
            continue
        out[id(neuron)] = (neuron, backbone)
    return list(out.values())


def install(optimizer: SLNB, model: nn.Module, neurons: list[Neuron],
            handles: list[RemovableHandle], hooks: list[CaptureHook]) -> list[str]:
    """Hook ``neurons`` for ``optimizer``; append to ``handles`` and ``hooks``.

    A module already hooked by another SLNB optimizer loses that hook (only the newest optimizer
    on a module captures its inputs). Returns the names of the modules taken from a live
    optimizer, so that the caller can say so.
    """
    taken: list[str] = []
    targets: list[tuple[nn.Module, Neuron, str, str]] = [
        (n.module, n, INPUT, n.name) for n in neurons]
    targets += [(backbone, n, HIDDEN, f"{n.name} (from the backbone's hidden states)")
                for n, backbone in head_sources(model, neurons)]
    if any(h.optimizer not in (None, optimizer) for m, *_ in targets for h in hooks_on(m)):
        gc.collect()  # an optimizer discarded in a reference cycle (a re-run notebook cell)
    for module, neuron, source, name in targets:
        for old in hooks_on(module):
            owner = old.optimizer
            if owner is optimizer or old.source != source:
                continue
            if owner is not None and old.active:
                taken.append(name)
                owner._hooks_taken.append(name)
            old.active = False
            unhook(module, old)
        hook = CaptureHook(optimizer, neuron, source)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
        hooks.append(hook)
    return taken


def remove(handles: list[RemovableHandle], hooks: list[CaptureHook]) -> None:
    """Remove every hook in ``handles`` and deactivate ``hooks`` (safe to call twice).

    Also the finalizer of a discarded optimizer: it must not refer to the optimizer itself.
    """
    for hook in hooks:
        hook.active = False
    for handle in handles:
        handle.remove()
    handles.clear()
    hooks.clear()


__all__ = ["HIDDEN", "INPUT", "CaptureHook", "head_sources", "hooks_on", "install", "remove",
           "unhook"]
