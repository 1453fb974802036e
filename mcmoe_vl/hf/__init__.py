"""Hugging Face integration: compressed checkpoint directories load with transformers' ``from_pretrained``.

``import mcmoe_vl`` registers the ``mcmoe_vl`` quantization method with transformers (5.x:
``register_quantization_config`` / ``register_quantizer``; see :mod:`.hook` for when), so that::

    import mcmoe_vl
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/mixtral-2.5b")      # packed, strict, pruning applied

loads a directory written by ``mcmoe-vl quantize`` (or the suite, or ``model.save_pretrained``) with the same
modules and bit-identical outputs as :func:`mcmoe_vl.quant.checkpoint.load_quantized`. Pruning settings saved in the
directory (``pruning.json``: ODP thresholds or OTP predictors) are applied on load; turn that off with
``with mcmoe_vl.hf.loading_options(apply_pruning=False): ...`` or afterwards with ``model.mcmoe_pruning.remove()``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["loading_options", "register"]


def __getattr__(name: str) -> Any:  # the quantizer module imports torch and transformers: only on use
    if name in __all__:
        from . import quantizer

        return getattr(quantizer, name)
    raise AttributeError(f"module 'mcmoe_vl.hf' has no attribute {name!r}")
