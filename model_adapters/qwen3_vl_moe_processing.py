"""Qwen3-VL-MoE model inputs from image+text samples, and :func:`lmms_model` (the lmms-eval model, in
:mod:`.qwen3_vl_moe_lmms`). Inputs come without torchvision: the tokenizer plus transformers' PIL image processor
(``Qwen2VLImageProcessorPil``). Each image becomes ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``
with n = t * h * w / merge_size**2 patches, as transformers' ``Qwen3VLProcessor`` expands it::

    processor = Qwen3VLMoeProcessor.from_model(tokenizer, model)
    batch = processor([sample_a, sample_b])   # input_ids, attention_mask (left padding), mm_token_type_ids,
                                              # pixel_values, image_grid_thw, image_token_mask
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mcmoe_vl.calibration.image_text import ImageTextSample, open_image

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


# -- lmms-eval -------------------------------------------------------------------------------------------------------
def lmms_model(model: Any, processor: Qwen3VLMoeProcessor, *, batch_size: int = 1, max_new_tokens: int = 32) -> Any:
    """An lmms-eval model serving an in-memory Qwen3-VL-MoE: :class:`~.qwen3_vl_moe_lmms.Qwen3VLMoeLMMS` (its module,
    which imports lmms-eval, is imported here on first use)."""
    from .qwen3_vl_moe_lmms import Qwen3VLMoeLMMS

    return Qwen3VLMoeLMMS(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)
