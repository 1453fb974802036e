"""The model-adapter registry, keyed by the Hugging Face ``model_type``."""

from __future__ import annotations

from mcmoe_vl.registry import Registry

ENTRY_POINT_GROUP = "mcmoe_vl.adapters"

ADAPTERS: Registry[type] = Registry(
    "model adapter (model_type)",
    entry_point_group=ENTRY_POINT_GROUP,
    how_to_add=(
        "To add a family, subclass model_adapters.base.MoEAdapter, decorate it with "
        "@ADAPTERS.register('<model_type>') or expose it under the 'mcmoe_vl.adapters' entry-point group of your "
        "package; see docs/adapters.md."
    ),
)
