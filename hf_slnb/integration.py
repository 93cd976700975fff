"""Compatibility module: the Hugging Face Trainer glue now lives in :mod:`hf_slnb.hf`.

Everything that was importable from ``hf_slnb.integration`` still is (the same objects, not
copies). Importing it imports :mod:`hf_slnb.hf`, which imports transformers and adds ``slnb`` to
``OptimizerNames`` (see that package's docstring); nothing else happens at import.
"""

# ruff: noqa: I001  (public names first, then the old module's private helpers)

from __future__ import annotations

# The import of hf_slnb.hf imports transformers.training_args; the start-up hook
# (_hf_slnb_autoregister) sees this module still loading (no patch_module yet) and leaves the
# registration to hf_slnb.hf.
from .hf.args import (
    DEFAULT_PRESET,
    HF_OPTIONS,
    OPTIM_NAME,
    TRAINER_OPTIONS,
    SLNBTrainingArguments,
    parse_optim_args,
    resolved_config,
    resolved_option,
    slnb_optimizer_kwargs,
)
from .hf.card import (
    add_to_model_card,
    card_hyperparameters,
    describe_update,
    model_card_section,
)
from .hf.patch import (
    AUTOREGISTER_ENV,
    SUPPORTED_TRANSFORMERS,
    check_transformers_version,
    patch_module,
    register,
    unwrap_optimizer,
)

# The private helpers of the old module, for code that reached into it (not API).
from .hf.args import _convert, _option_types  # noqa: F401
from .hf.checks import (  # noqa: F401
    _check_setup,
    _env_true,
    _fsdp_version,
    _is_slnb,
    _lr_is_radius,
    _resolve_learning_rate,
    _unsupported,
    _validate,
)
from .hf.patch import (  # noqa: F401
    _bind_model,
    _destroy_process_group_at_exit,
    _extend_enum,
    _extract_hyperparameters,
    _get_optimizer_cls_and_kwargs,
    _patch_trainer,
    _patch_training_args,
    _post_init,
    _trainer_init,
    _trainer_log,
    _wrap,
)

__all__ = ["AUTOREGISTER_ENV", "DEFAULT_PRESET", "HF_OPTIONS", "OPTIM_NAME",
           "SUPPORTED_TRANSFORMERS", "TRAINER_OPTIONS", "SLNBTrainingArguments",
           "add_to_model_card", "card_hyperparameters", "check_transformers_version",
           "describe_update", "model_card_section", "parse_optim_args", "patch_module", "register",
           "resolved_config", "resolved_option", "slnb_optimizer_kwargs", "unwrap_optimizer"]
