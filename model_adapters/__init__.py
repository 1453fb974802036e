"""Model adapters: one module per MoE family, registered by the Hugging Face ``model_type``.

``get_adapter(model_or_model_type)`` returns an adapter instance; ``ADAPTERS`` is the registry (third parties add
families through the ``mcmoe_vl.adapters`` entry-point group).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from .base import MoEAdapter
from .registry import ADAPTERS, ENTRY_POINT_GROUP

log = logging.getLogger(__name__)

# In-tree families. A module listed here that fails to import is reported, not hidden.
_BUILTIN = ("mixtral", "deepseek", "deepseek_vl2", "qwen3_vl_moe")  # qwen3_moe arrives through its entry point, like a plugin

for _mod in _BUILTIN:
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{_mod}":
            raise
        log.debug("adapter module %s not present", _mod)


def get_adapter(model_or_type: Any) -> MoEAdapter:
    """The adapter for a model (by ``model.config.model_type``) or for a ``model_type`` string."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise ValueError(f"{type(model_or_type).__name__} has no config.model_type; pass the model_type explicitly")
    return ADAPTERS.get(model_type)()


__all__ = ["ADAPTERS", "ENTRY_POINT_GROUP", "MoEAdapter", "get_adapter"]
