"""lmms-eval model ``mcmoe``: a DeepSeek-VL2 directory (official checkpoint or compressed) served by the port's
lmms-eval model.

lmms-eval 0.7.3 reads the ``lmms_eval.models`` entry-point group; pyproject.toml points it at :func:`manifests`, so
with the package installed the stock command finds the model::

    lmms-eval --model mcmoe --model_args pretrained=DIR --tasks mcmoe_vqa_colour --include_path tasks/lmms_eval

``model_args``: ``pretrained``, ``apply_pruning`` (default true), ``max_new_tokens`` (default 32, as the suite),
``batch_size``, ``device``, ``runtime`` (``packed`` or ``fake``).
"""

from __future__ import annotations

from typing import Any

from model_adapters.deepseek_vl2.lmms_model import DeepseekVL2LMMS

MODEL_NAME = "mcmoe"
CLASS_PATH = "mcmoe_vl.evaluation.harness_lmms_eval.McMoeLMMS"


def _bool(value: Any) -> bool:
    from mcmoe_vl.evaluation.harness_lm_eval import as_bool

    return as_bool(value) if isinstance(value, str) else bool(value)


class McMoeLMMS(DeepseekVL2LMMS):
    """:class:`DeepseekVL2LMMS` built from a directory by its ``from_pretrained``."""

    is_simple = True

    def __init__(self, pretrained: str, apply_pruning: Any = True, batch_size: Any = 1, max_new_tokens: Any = 32,
                 device: str | None = None, runtime: str = "packed", **kwargs: Any) -> None:
        from transformers import AutoTokenizer

        from model_adapters.deepseek_vl2.loading import from_pretrained
        from model_adapters.deepseek_vl2.processing import DeepseekVL2Processor

        kwargs.pop("max_batch_size", None)  # lmms-eval passes it to every model
        if kwargs:
            raise ValueError(f"mcmoe: unknown model_args {sorted(kwargs)}; valid: pretrained, apply_pruning, "
                             "batch_size, max_new_tokens, device, runtime")
        model = from_pretrained(pretrained, device=device or "cpu", apply_pruning=_bool(apply_pruning),
                                runtime=runtime)
        processor = DeepseekVL2Processor.from_config(AutoTokenizer.from_pretrained(str(pretrained)), model)
        super().__init__(model, processor, batch_size=int(batch_size), max_new_tokens=int(max_new_tokens))


def manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: the model's manifest for lmms-eval's registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)]


def register() -> None:
    """Register the manifest directly (for a process where the entry point is not installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for m in manifests():
        MODEL_REGISTRY_V2.register_manifest(m, overwrite=True)
