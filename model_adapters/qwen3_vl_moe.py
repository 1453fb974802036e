"""Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``, ``model_type: qwen3_vl_moe``): the vision-language worked
example of adding a family (docs/adapters.md).

The language model's MoE blocks are ``Qwen3VLMoeTextSparseMoeBlock``: a softmax router whose top-k weights are
always renormalised (the router divides by their sum whatever ``norm_topk_prob`` says), fused 3-D experts
(``experts.gate_up_proj`` / ``experts.down_proj``), no shared experts; layers in ``mlp_only_layers`` (or off the
``decoder_sparse_step``) are dense. The decoder lives at ``model.model.language_model``.

The adapter owns the modality: the model is vision-language (lmms-eval evaluates it), loads with transformers
(``Qwen3VLMoeForConditionalGeneration``, not ``AutoModelForCausalLM``), and its image tokens are the positions whose
id is the config's ``image_token_id`` (``image_token_mask``, which the calibration batches of
:mod:`.qwen3_vl_moe_processing` carry).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mcmoe_vl.moe.interface import RoutingSpec, Scoring

from .base import Modality, MoEAdapter
from .registry import ADAPTERS


@ADAPTERS.register("qwen3_vl_moe")
class Qwen3VLMoeAdapter(MoEAdapter):
    name = "qwen3_vl_moe"
    family = "Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration): vision encoder + softmax-routed MoE LM"
    moe_block_classes = ("Qwen3VLMoeTextSparseMoeBlock",)
    modality = Modality.VISION_LANGUAGE

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def routing_spec(self, config: Any, block: nn.Module) -> RoutingSpec:
        return RoutingSpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                           scoring=Scoring.SOFTMAX, norm_topk_prob=True)

    # -- the modality ------------------------------------------------------------------------------------------
    def load_model(self, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> nn.Module:
        from transformers import Qwen3VLMoeForConditionalGeneration

        model, info = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(path), dtype=dtype,
                                                                         output_loading_info=True)
        missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
        if missing:
            raise ValueError(f"{path} does not hold every weight of its {self.name} architecture (missing or "
                             f"mismatched: {', '.join(map(str, missing[:5]))}); it is not an intact checkpoint")
        return model.to(device).eval()

    def meta_model(self, path: str | os.PathLike[str]) -> nn.Module:
        from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

        with torch.device("meta"):
            return Qwen3VLMoeForConditionalGeneration(AutoConfig.from_pretrained(str(path)))

    def load_processor(self, tokenizer: Any, model: nn.Module) -> Any:
        from .qwen3_vl_moe_processing import Qwen3VLMoeProcessor

        return Qwen3VLMoeProcessor.from_model(tokenizer, model)

    def calibration_batches(self, processor: Any, samples: Sequence[Any], batch_size: int = 1
                            ) -> list[dict[str, Any]]:
        """Left-padded model inputs of ``batch_size`` samples each, with ``image_token_mask``."""
        return [processor(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]

    def lmms_model(self, model: nn.Module, processor: Any, *, batch_size: int = 1, max_new_tokens: int = 32) -> Any:
        from .qwen3_vl_moe_processing import lmms_model

        return lmms_model(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)

    def check_layerwise(self, model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> None:
        """Refuse image batches when the vision encoder feeds "deepstack" features into the first decoder layers
        (``vision_config.deepstack_visual_indexes``; every released Qwen3-VL-MoE does): the layer-by-layer pass
        replays each layer from its captured input only, without those additions, so its statistics and GPTQ
        Hessians would silently differ from the model's own forward. Text-only batches are exact."""
        vision = getattr(model.config, "vision_config", None)
        deepstack = list(getattr(vision, "deepstack_visual_indexes", None) or [])
        with_images = sum(b.get("pixel_values") is not None for b in batches)
        if deepstack and with_images:
            raise NotImplementedError(
                f"{self.name}: {with_images} calibration batch(es) hold images, and this model adds deepstack "
                f"visual features (vision_config.deepstack_visual_indexes={deepstack}) inside its first decoder "
                "layers, which the layer-by-layer pass does not replay; valid: text-only calibration data for this "
                "model, or a model with deepstack_visual_indexes=[]")

    def image_token_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """``image_token_mask`` as the batch gives it (calibration batches of this family carry one)."""
        return batch.get("image_token_mask")
