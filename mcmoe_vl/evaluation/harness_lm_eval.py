"""lm-eval model ``mcmoe``: a model directory (compressed or not) loaded through transformers with the mcmoe_vl
format registered, served by lm-eval's own ``HFLM``.

Importing this module registers the name with lm-eval's model registry. lm-eval 0.4.13 reads no entry points for
models, so its stock ``lm_eval`` command cannot find ``mcmoe`` by itself; run it through the wrapper, which imports
this module and then hands the arguments to lm-eval's own command line::

    python -m mcmoe_vl.evaluation.harness lm-eval --model mcmoe --model_args pretrained=DIR \\
        --tasks mcmoe_docstring_cloze --include_path tasks/lm_eval

``model_args``: ``pretrained`` (the directory), ``apply_pruning`` (default true: the directory's pruning settings),
``runtime`` (``packed``, the default, or ``fake``: dequantised weights cached, faster, identical scores) and any
``HFLM`` argument (``batch_size``, ``max_length``, ``device``).
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM

log = logging.getLogger(__name__)

MODEL_NAME = "mcmoe"
_IGNORED = ("dtype", "torch_dtype", "trust_remote_code", "revision", "backend")  # fixed by the directory


def as_bool(value: Any) -> bool:
    """lm-eval passes model_args as strings or parsed literals."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)


def load_causal_lm(path: str, *, apply_pruning: bool = True, runtime: str = "packed") -> Any:
    """``AutoModelForCausalLM.from_pretrained(path)`` with the mcmoe_vl format registered."""
    import mcmoe_vl  # noqa: F401  (registers the quantization method with transformers)
    from transformers import AutoModelForCausalLM

    from mcmoe_vl.hf import loading_options

    with loading_options(apply_pruning=apply_pruning, runtime=runtime):
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()


class McMoeLM(HFLM):
    """lm-eval's ``HFLM`` around a (compressed) model directory loaded by :func:`load_causal_lm`."""

    def __init__(self, pretrained: str, apply_pruning: Any = True, runtime: str = "packed", tokenizer: Any = None,
                 **kwargs: Any) -> None:
        from transformers import AutoTokenizer

        for key in _IGNORED:
            if kwargs.pop(key, None) is not None:
                log.info("mcmoe: %s is set by the checkpoint directory; ignoring the argument", key)
        model = load_causal_lm(pretrained, apply_pruning=as_bool(apply_pruning), runtime=runtime)
        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else \
            AutoTokenizer.from_pretrained(tokenizer or str(pretrained))
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)


if MODEL_NAME not in model_registry:
    register_model(MODEL_NAME)(McMoeLM)
