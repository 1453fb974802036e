"""Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``, ``model_type: qwen3_vl_moe``): the vision-language worked
example of adding a family (docs/adapters.md).

The language model's MoE blocks are ``Qwen3VLMoeTextSparseMoeBlock``: a softmax router whose top-k weights are
always renormalised (the router divides by their sum whatever ``norm_topk_prob`` says), fused 3-D experts
(``experts.gate_up_proj`` / ``experts.down_proj``), no shared experts; layers in ``mlp_only_layers`` (or off the
``decoder_sparse_step``) are dense. The decoder lives at ``model.model.language_model``.

The adapter owns the modality: the model is vision-language (lmms-eval evaluates it), loads with transformers
(``Qwen3VLMoeForConditionalGeneration``, not ``AutoModelForCausalLM``), and its image tokens are the positions whose
id is the config's ``image_token_id`` (``image_token_mask``, which the calibration batches of
:class:`Qwen3VLMoeProcessor` carry). The processor needs no torchvision: the tokenizer plus transformers' PIL image
processor (``Qwen2VLImageProcessorPil``); each image becomes ``<|vision_start|>`` + n x ``<|image_pad|>`` +
``<|vision_end|>`` with n = t * h * w / merge_size**2 patches, as transformers' ``Qwen3VLProcessor`` expands it.
The lmms-eval model lives in :mod:`.qwen3_vl_moe_lmms` (it imports lmms-eval; imported on first use).

Its forward adds the vision encoder's "deepstack" features to the hidden states after the first decoder layers,
outside the layers; :class:`DeepstackAdditions` (``layer_additions()``) lets the layer-by-layer pass replay them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcmoe_vl.calibration.image_text import ImageTextSample, open_image
from mcmoe_vl.moe.routing import RoutingSpec, Scoring

from .base import Modality, MoEAdapter
from .registry import ADAPTERS


# -- model inputs ----------------------------------------------------------------------------------------------------
IMAGE_TOKEN, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"


class Qwen3VLMoeProcessor:
    """Tokenizer + image processor of one Qwen3-VL-MoE model (its patch geometry read from the vision config)."""

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, image_processor: Any, *, merge_size: int) -> None:
        self.tokenizer, self.image_processor, self.merge_size = tokenizer, image_processor, merge_size
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")

    @classmethod
    def from_model(cls, tokenizer: Any, model: Any, **image_kw: Any) -> Qwen3VLMoeProcessor:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        v = model.config.vision_config
        ip = Qwen2VLImageProcessorPil(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                      merge_size=v.spatial_merge_size, **image_kw)
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.config.image_token_id:
            raise ValueError(f"the tokenizer's {IMAGE_TOKEN} id differs from the model's image_token_id "
                             f"{model.config.image_token_id}: they belong to different checkpoints")
        return cls(tokenizer, ip, merge_size=v.spatial_merge_size)

    def __call__(self, samples: Sequence[ImageTextSample]) -> dict[str, torch.Tensor]:
        ids, pixels, grids = [], [], []
        for s in samples:
            prompt = ""
            if s.images:
                out = self.image_processor(images=[open_image(im) for im in s.images], return_tensors="pt")
                pixels.append(out["pixel_values"])
                grids.append(out["image_grid_thw"])
                for t, h, w in out["image_grid_thw"].tolist():
                    prompt += VISION_START + IMAGE_TOKEN * (t * h * w // self.merge_size**2) + VISION_END
            prompt += s.text + (" " + s.answer if s.answer else "")
            ids.append(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in ids])  # (B, S), left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        image = input_ids == self.image_token_id
        # mm_token_type_ids (1 = image token) drives the model's multimodal rotary positions
        batch = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": image.int(),
                 "image_token_mask": image}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)  # (patches, C * T * P * P)
            batch["image_grid_thw"] = torch.cat(grids)  # (images, 3)
        return batch


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
        return Qwen3VLMoeProcessor.from_model(tokenizer, model)

    def calibration_batches(self, processor: Any, samples: Sequence[Any], batch_size: int = 1
                            ) -> list[dict[str, Any]]:
        """Left-padded model inputs of ``batch_size`` samples each, with ``image_token_mask``."""
        return [processor(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]

    def lmms_model(self, model: nn.Module, processor: Any, *, batch_size: int = 1, max_new_tokens: int = 32) -> Any:
        """:class:`~.qwen3_vl_moe_lmms.Qwen3VLMoeLMMS` around the in-memory model (imports lmms-eval)."""
        from .qwen3_vl_moe_lmms import Qwen3VLMoeLMMS

        return Qwen3VLMoeLMMS(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)

    def check_layerwise(self, model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> None:
        """Refuse image batches on a deepstack model (``vision_config.deepstack_visual_indexes``; every released
        Qwen3-VL-MoE) when the installed transformers' text model does not take the deepstack features as the
        keyword arguments :class:`DeepstackAdditions` records: the layer-by-layer pass would skip them."""
        vision = getattr(model.config, "vision_config", None)
        deepstack = list(getattr(vision, "deepstack_visual_indexes", None) or [])
        with_images = sum(b.get("pixel_values") is not None or b.get("pixel_values_videos") is not None
                          for b in batches)
        if not (deepstack and with_images):
            return
        params = inspect.signature(self.language_model(model).forward).parameters
        missing = [k for k in DeepstackAdditions.KWARGS if k not in params]
        if missing:
            raise NotImplementedError(
                f"{self.name}: {with_images} calibration batch(es) hold images and this model adds deepstack visual "
                f"features (vision_config.deepstack_visual_indexes={deepstack}), but its text model's forward takes "
                f"no {', '.join(missing)}, so the layer-by-layer pass cannot replay them; valid: a transformers "
                "version whose Qwen3VLMoeTextModel.forward takes visual_pos_masks and deepstack_visual_embeds, or "
                "text-only calibration data")

    def layer_additions(self, model: nn.Module) -> DeepstackAdditions:
        """The deepstack visual features the text model adds after its first decoder layers."""
        return DeepstackAdditions(self.language_model(model))

    def image_token_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """``image_token_mask`` as the batch gives it (calibration batches of this family carry one)."""
        return batch.get("image_token_mask")


@dataclass
class DeepstackState:
    """One batch's deepstack features, as the model passed them to its text model."""

    visual_pos_masks: torch.Tensor  # (B, S) bool: the image and video token positions
    embeds: list[torch.Tensor]  # per decoder layer i < len(embeds): (n_visual, H) added after layer i


class DeepstackAdditions:
    """Qwen3-VL-MoE's deepstack: after decoder layer ``i < len(deepstack_visual_embeds)`` the text model adds
    ``deepstack_visual_embeds[i]`` (features of a vision-encoder layer, one row per visual token) to the hidden
    states at ``visual_pos_masks``. :meth:`record` keeps both from the keyword arguments of the text model's forward
    (``Qwen3VLMoeTextModel.forward``); :meth:`after_layer` adds them as that forward does. A
    :class:`mcmoe_vl.moe.layerwise.LayerAdditions`."""

    KWARGS = ("visual_pos_masks", "deepstack_visual_embeds")

    def __init__(self, language_model: nn.Module) -> None:
        self.source = language_model

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DeepstackState | None:
        mask, embeds = (kwargs.get(k) for k in self.KWARGS)
        if embeds is None or len(embeds) == 0:  # a text-only batch, or a model without deepstack
            return None
        if mask is None:
            raise ValueError("the text model received deepstack_visual_embeds without visual_pos_masks")
        mask = mask.detach().bool()
        n = int(mask.sum())
        for i, e in enumerate(embeds):
            if e.shape[0] != n:
                raise ValueError(f"deepstack_visual_embeds[{i}] has {e.shape[0]} rows for {n} visual positions")
        return DeepstackState(mask, [e.detach() for e in embeds])

    def after_layer(self, index: int, hidden: torch.Tensor, state: DeepstackState | None) -> torch.Tensor:
        if state is None or index >= len(state.embeds):
            return hidden
        mask = state.visual_pos_masks.to(hidden.device)
        out = hidden.clone()  # (B, S, H); the layer's own outputs stay as they were
        out[mask] = out[mask] + state.embeds[index].to(hidden.device, hidden.dtype)
        return out
