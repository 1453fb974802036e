"""Model adapters: one module per MoE family, registered by the Hugging Face ``model_type``.

``get_adapter(model_or_model_type)`` returns an adapter instance; ``ADAPTERS`` is the registry (third parties add
families through the ``mcmoe_vl.adapters`` entry-point group). ``expert_interface(model)`` is the common expert
interface over a model with its family's adapter::

    with expert_interface(model) as iface:      # ExpertInterface(model, get_adapter(model)), installed
        iface.layers[0].expert_weights(3)
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from mcmoe_vl.moe.interface import ExpertInterface

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


def adapter_of_directory(path: str | os.PathLike[str]) -> MoEAdapter:
    """The adapter of a local model directory: a compressed checkpoint's manifest names it (the adapter it was
    quantized with, else its ``model_type``; the manifest is integrity-checked), an original checkpoint's
    ``config.json`` gives its ``model_type``."""
    from mcmoe_vl.io import read_json
    from mcmoe_vl.quant.checkpoint import MANIFEST_FILE, read_manifest
    from mcmoe_vl.registry import RegistryError

    p = Path(path)
    if (p / MANIFEST_FILE).is_file():
        man = read_manifest(p)
        source, name = p / MANIFEST_FILE, man.adapter or man.model_type
    elif (p / "config.json").is_file():
        cfg = read_json(p / "config.json", what="model config")
        source, name = p / "config.json", cfg.get("model_type") if isinstance(cfg, dict) else None
    else:
        raise FileNotFoundError(f"{p} is not a model directory: it has neither {MANIFEST_FILE} (a compressed "
                                "checkpoint) nor config.json (an original checkpoint)")
    if not name:
        raise ValueError(f"{source} names no model_type; valid model types: {', '.join(ADAPTERS.names())}")
    try:
        return ADAPTERS.get(str(name))()
    except RegistryError as exc:
        raise ValueError(f"{source}: model_type {name!r} has no adapter: {exc}") from None


def expert_interface(model: nn.Module, *, install: bool = False) -> ExpertInterface:
    """The common expert interface over ``model`` with the adapter of its family (:func:`get_adapter`).

    Not installed unless ``install``; ``with expert_interface(model) as iface:`` installs it for the block."""
    return ExpertInterface(model, get_adapter(model), install=install)


__all__ = ["ADAPTERS", "ENTRY_POINT_GROUP", "MoEAdapter", "adapter_of_directory", "expert_interface", "get_adapter"]
