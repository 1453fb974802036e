"""Register the mcmoe_vl format with transformers when transformers' quantizer registry is imported.

``import mcmoe_vl`` must be enough for ``from_pretrained`` to know the format, but importing transformers'
quantizer registry costs seconds (it imports much of transformers), which every ``mcmoe-vl --help`` would pay. So
the registration runs at once if the registry is already imported, and otherwise right after it is first imported
(a one-shot post-import hook on the ``transformers.quantizers`` package); nothing else is imported until then.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

TARGET = "transformers.quantizers"  # the package: its __init__ imports the registry (.auto) and the base class


def _register() -> None:
    try:
        from mcmoe_vl.hf.quantizer import register

        register()
    except Exception as exc:  # noqa: BLE001 - must not break transformers' own import; the failure is reported
        log.warning("could not register the mcmoe_vl checkpoint format with transformers: %s", exc)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds ``TARGET`` with the other finders and registers once its module has executed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; and the lookup below must not find this hook again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register()

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def install() -> None:
    """Register now if transformers' quantizer registry is imported, else when it is."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())
