"""The expert-interface adapter of DeepSeek-VL2 (``model_type: deepseek_vl_v2``), and its calibration inputs.

The language model's MoE blocks are transformers' ``DeepseekV2Moe`` (greedy softmax: tiny, small) or
``DeepseekV3MoE`` (sigmoid ``noaux_tc``: full), so routing specs come from the DeepSeek-V2 / V3 language-model
adapters (:mod:`model_adapters.deepseek`); this adapter only says where the decoder lives (``model.language``).
Routed experts are the fused ``experts`` tensors, shared experts ``shared_experts``.

The adapter owns the family's modality (vision-language): it loads official checkpoints through the port
(:mod:`.loading`, one device, local files), builds the processor, turns image+text samples into calibration
batches whose ``images_seq_mask`` marks image tokens (:meth:`DeepseekVL2Adapter.image_token_mask`, which the
calibration pass uses to split statistics into image and text tokens) and serves the lmms-eval model::

    adapter = DeepseekVL2Adapter()
    batches = adapter.calibration_batches(processor, samples, batch_size=4)
    stats = calibrate(model, batches, CalibrationConfig())
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mcmoe_vl.calibration.image_text import ImageTextSample, open_image
from mcmoe_vl.calibration.image_text import load_image_text_samples  # noqa: F401  (re-exported: older imports)
from mcmoe_vl.moe.routing import RoutingSpec
from model_adapters.base import Modality, MoEAdapter
from model_adapters.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from model_adapters.registry import ADAPTERS

log = logging.getLogger(__name__)


@ADAPTERS.register("deepseek_vl_v2")
class DeepseekVL2Adapter(MoEAdapter):
    name = "deepseek_vl_v2"
    family = "DeepSeek-VL2 (DeepseekVL2ForCausalLM): SigLIP + DeepSeek-MoE LM, greedy softmax or noaux_tc sigmoid"
    moe_block_classes = DeepseekV2Adapter.moe_block_classes + DeepseekV3Adapter.moe_block_classes
    shared_experts_attr = "shared_experts"
    modality = Modality.VISION_LANGUAGE
    hub_loadable = False  # the port reads official checkpoints from local files, on one device

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

    # -- the modality ------------------------------------------------------------------------------------------
    def load_model(self, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> nn.Module:
        from .loading import load_official

        return load_official(path, dtype=dtype, device=device)

    def load_compressed(self, path: str | os.PathLike[str], *, runtime: str = "packed", apply_pruning: bool = True,
                        device: str | torch.device = "cpu") -> nn.Module:
        """Through the port (:func:`.loading.load_compressed`: config.json in the official layout, checked against
        the manifest)."""
        from .loading import load_compressed

        return load_compressed(path, device=device, apply_pruning=apply_pruning, runtime=runtime)

    def hub_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under the official checkpoints' names and shapes (:func:`.loading.official_tensors`: the vision
        encoder's fused ``qkv`` and its own names)."""
        from .loading import official_tensors

        return official_tensors(dict(tensors))

    def meta_model(self, path: str | os.PathLike[str]) -> nn.Module:
        from .configuration import DeepseekVL2Config
        from .loading import read_official_config
        from .modeling import DeepseekVL2ForCausalLM

        cfg = DeepseekVL2Config.from_official(read_official_config(path))
        with torch.device("meta"):
            return DeepseekVL2ForCausalLM(cfg)

    def load_processor(self, tokenizer: Any, model: nn.Module) -> Any:
        from .processing import DeepseekVL2Processor

        return DeepseekVL2Processor.from_config(tokenizer, model)

    def calibration_batches(self, processor: Any, samples: Sequence[ImageTextSample], batch_size: int = 1
                            ) -> list[dict[str, Any]]:
        return list(image_text_batches(processor, samples, batch_size=batch_size))

    def image_token_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """``image_token_mask`` when given, else the model's own image-position input ``images_seq_mask``."""
        mask = batch.get("image_token_mask")
        return batch.get("images_seq_mask") if mask is None else mask

    def lmms_model(self, model: nn.Module, processor: Any, *, batch_size: int = 1, max_new_tokens: int = 32) -> Any:
        from .lmms_model import DeepseekVL2LMMS

        return DeepseekVL2LMMS(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)


# -- calibration inputs ---------------------------------------------------------------------------------------------
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
            processed.append(processor.process_one(conv, [open_image(im) for im in s.images],
                                                   inference=s.answer is None))
        yield processor.collate(processed)
