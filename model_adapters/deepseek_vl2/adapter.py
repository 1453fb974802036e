"""The expert-interface adapter of DeepSeek-VL2 (``model_type: deepseek_vl_v2``), and its calibration inputs.

The language model's MoE blocks are transformers' ``DeepseekV2Moe`` (greedy softmax: tiny, small) or
``DeepseekV3MoE`` (sigmoid ``noaux_tc``: full), so routing specs come from the DeepSeek-V2 / V3 language-model
adapters (:mod:`model_adapters.deepseek`); this adapter only says where the decoder lives (``model.language``).
Routed experts are the fused ``experts`` tensors, shared experts ``shared_experts``.

Calibration batches are the processor's model inputs; ``images_seq_mask`` marks image tokens, which the
calibration pass uses to split statistics into image and text tokens::

    batches = image_text_batches(processor, samples, batch_size=4)
    stats = calibrate(model, batches, CalibrationConfig())
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcmoe_vl.moe.interface import RoutingSpec
from model_adapters.base import MoEAdapter
from model_adapters.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from model_adapters.registry import ADAPTERS

log = logging.getLogger(__name__)


@ADAPTERS.register("deepseek_vl_v2")
class DeepseekVL2Adapter(MoEAdapter):
    name = "deepseek_vl_v2"
    family = "DeepSeek-VL2 (DeepseekVL2ForCausalLM): SigLIP + DeepSeek-MoE LM, greedy softmax or noaux_tc sigmoid"
    moe_block_classes = DeepseekV2Adapter.moe_block_classes + DeepseekV3Adapter.moe_block_classes
    shared_experts_attr = "shared_experts"

    def text_config(self, model: nn.Module) -> Any:
        return model.config.text_config

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.language.model

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.language.lm_head

    def _lm_adapter(self, block: nn.Module) -> MoEAdapter:
        name = type(block).__name__
        if name in DeepseekV3Adapter.moe_block_classes:
            return DeepseekV3Adapter()
        if name in DeepseekV2Adapter.moe_block_classes:
            return DeepseekV2Adapter()
        raise TypeError(f"unknown DeepSeek MoE block {name}")

    def routing_spec(self, config: Any, block: nn.Module) -> RoutingSpec:
        return self._lm_adapter(block).routing_spec(config, block)

    def router(self, block: nn.Module, spec: RoutingSpec):
        return self._lm_adapter(block).router(block, spec)


# -- calibration inputs ---------------------------------------------------------------------------------------------


@dataclass
class ImageTextSample:
    """One calibration sample: a user text with ``<image>`` tags (prepended when absent), its images, and an
    optional answer (then the sample is a full exchange, as in supervised data)."""

    text: str
    images: list[Any] = field(default_factory=list)  # PIL images or paths
    answer: str | None = None


def load_image_text_samples(path: str | Path) -> list[ImageTextSample]:
    """Samples from a JSONL file: one object per line with ``text``, ``image`` (a path or a list of paths,
    relative to the file) and optionally ``answer``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration samples file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "text" not in rec:
            raise ValueError(f"{path}:{n}: no 'text'")
        imgs = rec.get("image") or rec.get("images") or []
        imgs = [imgs] if isinstance(imgs, str) else list(imgs)
        out.append(ImageTextSample(rec["text"], [str(path.parent / p) for p in imgs], rec.get("answer")))
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def _open(img: Any) -> Any:
    from PIL import Image

    return Image.open(img).convert("RGB") if isinstance(img, (str, Path)) else img


def image_text_batches(
    processor: Any,
    samples: Sequence[ImageTextSample],
    batch_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Model-input batches (left-padded) for the calibration pass: ``input_ids``, ``attention_mask``, ``images``,
    ``images_seq_mask``, ``images_spatial_crop``. Images are opened lazily, one batch at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tag = processor.image_token
    for i in range(0, len(samples), batch_size):
        processed = []
        for s in samples[i : i + batch_size]:
            text = s.text if s.text.count(tag) == len(s.images) else tag * len(s.images) + "\n" + s.text
            conv = [{"role": "user", "content": text}, {"role": "assistant", "content": s.answer or ""}]
            processed.append(processor.process_one(conv, [_open(im) for im in s.images], inference=s.answer is None))
        yield processor.collate(processed)
