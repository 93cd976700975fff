"""Auto-registration of ``--optim slnb`` with the Hugging Face Trainer, run at interpreter start.

Installing ``hf_slnb`` puts ``hf_slnb-autoregister.pth`` into site-packages; Python's ``site``
module runs its single line, which calls :func:`install`. That only appends a tiny import hook to
``sys.meta_path`` (standard library only, no torch, no transformers): nothing else happens until
a program imports one of the transformers modules below, and each is patched by
``hf_slnb.integration`` (the glue is in ``hf_slnb.hf``) right after it has loaded:

* ``transformers.training_args``: ``"slnb"`` becomes an ``OptimizerNames`` member, so
  ``--optim slnb`` parses, ``TrainingArguments(optim="slnb")`` validates and a checkpoint's
  ``training_args.bin`` unpickles;
* ``transformers.trainer``: the Trainer's optimizer for ``"slnb"``
  (``Trainer.get_optimizer_cls_and_kwargs``), fail-fast checks, SLNB diagnostics in the logs,
  the model card.

Set ``HF_SLNB_AUTOREGISTER=0`` to switch this off (then ``--optim slnb`` gives transformers' stock
error unless the program calls ``hf_slnb.register()``). A failure never breaks start-up or the
import of transformers: it becomes a warning and ``--optim slnb`` stays unknown.

This module is top-level, not ``hf_slnb._autoregister``, because importing anything inside the
``hf_slnb`` package imports torch, which would cost every Python start in the environment.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported at run time: this runs at every start-up
if TYPE_CHECKING:
    from typing import Any

ENV_VAR = "HF_SLNB_AUTOREGISTER"
_FALSE = ("0", "false", "no", "off")

#: Modules patched right after they load, in the order transformers imports them.
TARGETS = ("transformers.training_args", "transformers.trainer")


def enabled() -> bool:
    """Whether auto-registration is on (``HF_SLNB_AUTOREGISTER`` is not 0/false/no/off)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _FALSE


def _patch(module: Any) -> None:
    """Hand a freshly loaded transformers module to ``hf_slnb.integration``; never raise."""
    try:
        for name in ("hf_slnb.hf", "hf_slnb.integration"):
            loading = sys.modules.get(name)
            if loading is not None and not hasattr(loading, "patch_module"):
                return  # hf_slnb's glue itself is importing transformers; it registers on load
        from hf_slnb import integration

        integration.patch_module(module)
    except Exception as err:  # noqa: BLE001 - start-up must survive any change in transformers
        import warnings

        warnings.warn(
            f"hf_slnb could not register '--optim slnb' with transformers ({err}); "
            "'slnb' stays unknown to the Trainer. "
            f"Set {ENV_VAR}=0 to switch auto-registration off.",
            RuntimeWarning,
            stacklevel=2,
        )


class _PatchingLoader:
    """Wraps a module's loader: executes the module as usual, then patches it."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # Put the real loader back first, so nothing downstream ever sees this wrapper.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, resource readers, ...
        return getattr(self._loader, name)


class _HfSlnbFinder:
    """``sys.meta_path`` entry that only reacts to the transformers modules in ``TARGETS``."""

    def __init__(self, pending: list[str]) -> None:
        self.pending = set(pending)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Add the import hook once per process (several ``.pth`` copies are harmless)."""
    try:
        if not enabled() or any(type(f).__name__ == "_HfSlnbFinder" for f in sys.meta_path):
            return
        pending = [name for name in TARGETS if name not in sys.modules]
        if len(pending) < len(TARGETS):  # transformers already imported: patch what is there
            for name in TARGETS:
                if name in sys.modules:
                    _patch(sys.modules[name])
        if pending:
            sys.meta_path.insert(0, _HfSlnbFinder(pending))
    except Exception:  # noqa: BLE001, S110 - never break interpreter start-up
        pass
