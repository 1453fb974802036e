"""Qwen3-VL-MoE model inputs from image+text samples, and its lmms-eval model. Inputs come without torchvision: the tokenizer plus transformers' PIL
image processor (``Qwen2VLImageProcessorPil``). Each image becomes ``<|vision_start|>`` + n x ``<|image_pad|>`` +
``<|vision_end|>`` with n = t * h * w / merge_size**2 patches, as transformers' ``Qwen3VLProcessor`` expands it::

    processor = Qwen3VLMoeProcessor.from_model(tokenizer, model)
    batch = processor([sample_a, sample_b])   # input_ids, attention_mask (left padding), mm_token_type_ids,
                                              # pixel_values, image_grid_thw, image_token_mask
"""

from __future__ import annotations

import functools
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
    """An lmms-eval model serving an in-memory Qwen3-VL-MoE (imports lmms-eval): ``generate_until`` decodes greedily
    (``until`` strings cut the text), ``loglikelihood`` returns ``GenerationResult(text=(nll, is_greedy))`` as
    lmms-eval 0.7.3's multiple-choice scoring expects (the lowest loss wins; see
    :mod:`model_adapters.deepseek_vl2.lmms_model`)."""
    return _lmms_class()(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)


@functools.cache  # one class (lmms-eval is imported on first use): instances share their type
def _lmms_class() -> type:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms

    class Qwen3VLMoeLMMS(lmms):
        is_simple = True

        def __init__(self, model: Any, processor: Qwen3VLMoeProcessor, *, batch_size: int, max_new_tokens: int
                     ) -> None:
            super().__init__()
            self.model, self.processor, self.tokenizer = model.eval(), processor, processor.tokenizer
            self.batch_size_per_gpu, self.max_new_tokens = int(batch_size), int(max_new_tokens)

        @property
        def batch_size(self) -> int:
            return self.batch_size_per_gpu

        def _inputs(self, context: str, doc_to_visual: Any, doc_id: int, task: str, split: str) -> dict[str, Any]:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
            visuals = [] if visuals is None else visuals if isinstance(visuals, (list, tuple)) else [visuals]
            batch = self.processor([ImageTextSample(context, [v.convert("RGB") for v in visuals if v is not None])])
            batch.pop("image_token_mask")
            device = self.model.get_input_embeddings().weight.device
            return {k: v.to(device) for k, v in batch.items()}

        @torch.no_grad()
        def loglikelihood(self, requests: list[Any]) -> list[Any]:
            out = []
            for req in requests:
                context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                cont = str(doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc))
                x = self._inputs(context, doc_to_visual, doc_id, task, split)
                target = torch.tensor(self.tokenizer(cont, add_special_tokens=False)["input_ids"],
                                      device=x["input_ids"].device)
                n = x["input_ids"].shape[1]
                k = target.numel()
                x["input_ids"] = torch.cat([x["input_ids"], target[None]], dim=1)
                for key in ("attention_mask", "mm_token_type_ids"):
                    fill = 1 if key == "attention_mask" else 0
                    x[key] = torch.cat([x[key], torch.full((1, k), fill, dtype=x[key].dtype, device=x[key].device)], 1)
                logits = self.model(**x).logits[0, n - 1 : n - 1 + k].float()  # (k, V): each continuation token
                logp = torch.log_softmax(logits, -1).gather(1, target[:, None]).sum()
                greedy = bool((logits.argmax(-1) == target).all())
                out.append(GenerationResult(text=(-float(logp), greedy), token_counts=TokenCounts(output_tokens=0)))
            return out

        @torch.no_grad()
        def generate_until(self, requests: list[Any]) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                x = self._inputs(context, doc_to_visual, doc_id, task, split)
                tokens = self.model.generate(**x, do_sample=False, pad_token_id=self.processor.pad_id,
                                             max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)))
                text = self.tokenizer.decode(tokens[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out.append(text.strip())
                self.cache_hook.add_partial("generate_until", req.args, out[-1])
            return out

        def clean(self) -> None:  # the model is the caller's: keep it
            return None

        def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
            raise NotImplementedError("multi-round generation is not supported by the Qwen3-VL-MoE lmms model")

    return Qwen3VLMoeLMMS
