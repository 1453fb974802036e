"""lmms-eval model ``mcmoe``: a vision-language model directory (original checkpoint or compressed) of any registered
family, served by its adapter's lmms-eval model.

lmms-eval 0.7.3 reads the ``lmms_eval.models`` entry-point group; pyproject.toml points it at :func:`manifests`, so
with the package installed the stock command finds the model::

    lmms-eval --model mcmoe --model_args pretrained=DIR --tasks mcmoe_vqa_colour --include_path tasks/lmms_eval

The directory names its family: a compressed checkpoint's manifest (the adapter it was quantized with), an original
checkpoint's ``config.json`` (``model_type``). The adapter (:func:`model_adapters.adapter_of_directory`) loads the
model (:meth:`~model_adapters.base.MoEAdapter.load_compressed` or :meth:`~model_adapters.base.MoEAdapter.load_model`)
and its processor (:meth:`~model_adapters.base.MoEAdapter.load_processor`, from the directory's tokenizer) and
builds the lmms-eval model around them (:meth:`~model_adapters.base.MoEAdapter.lmms_model`).

``model_args``: ``pretrained``, ``apply_pruning`` (default true), ``max_new_tokens`` (default 32, as the suite),
``batch_size``, ``device``, ``runtime`` (``packed`` or ``fake``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms

MODEL_NAME = "mcmoe"
CLASS_PATH = "mcmoe_vl.evaluation.harness_lmms_eval.McMoeLMMS"
MODEL_ARGS = ("pretrained", "apply_pruning", "batch_size", "max_new_tokens", "device", "runtime")


def _bool(value: Any) -> bool:
    from mcmoe_vl.evaluation.harness_lm_eval import as_bool

    return as_bool(value) if isinstance(value, str) else bool(value)


def serve_directory(pretrained: str, *, apply_pruning: bool = True, batch_size: int = 1, max_new_tokens: int = 32,
                    device: str = "cpu", runtime: str = "packed") -> lmms:
    """The lmms-eval model of a vision-language model directory, built by the adapter of its family."""
    from transformers import AutoTokenizer

    from mcmoe_vl.quant.checkpoint import MANIFEST_FILE
    from model_adapters import ADAPTERS, adapter_of_directory

    path = Path(pretrained)
    adapter = adapter_of_directory(path)
    if not adapter.is_vision_language:
        vl = [n for n, cls in ADAPTERS.items() if cls().is_vision_language]
        raise ValueError(f"mcmoe (lmms-eval) serves vision-language models; {path} holds a {adapter.name} model "
                         f"({adapter.modality.value}): evaluate it with lm-eval (mcmoe-vl eval --harness lm-eval). "
                         f"Vision-language model types: {', '.join(vl)}")
    if (path / MANIFEST_FILE).is_file():
        model = adapter.load_compressed(path, runtime=runtime, apply_pruning=apply_pruning, device=device)
    else:
        model = adapter.load_model(path, device=device)
    processor = adapter.load_processor(AutoTokenizer.from_pretrained(str(path)), model)
    return adapter.lmms_model(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)


class McMoeLMMS(lmms):
    """The class lmms-eval resolves for ``mcmoe``. Constructing it returns the lmms-eval model of the directory's
    family (:func:`serve_directory`, an ``lmms`` instance), not an instance of this class: lmms-eval instantiates
    the class with the ``model_args`` and uses what it gets."""

    is_simple = True

    def __new__(cls, pretrained: str, apply_pruning: Any = True, batch_size: Any = 1, max_new_tokens: Any = 32,
                device: str | None = None, runtime: str = "packed", **kwargs: Any) -> lmms:  # type: ignore[misc]
        kwargs.pop("max_batch_size", None)  # lmms-eval passes it to every model
        if kwargs:
            raise ValueError(f"mcmoe: unknown model_args {sorted(kwargs)}; valid: {', '.join(MODEL_ARGS)}")
        return serve_directory(pretrained, apply_pruning=_bool(apply_pruning), batch_size=int(batch_size),
                               max_new_tokens=int(max_new_tokens), device=device or "cpu", runtime=runtime)


def manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: the model's manifest for lmms-eval's registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)]


def register() -> None:
    """Register the manifest directly (for a process where the entry point is not installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for m in manifests():
        MODEL_REGISTRY_V2.register_manifest(m, overwrite=True)
