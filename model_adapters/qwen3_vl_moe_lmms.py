"""The lmms-eval model of Qwen3-VL-MoE around an in-memory model and its processor.

Imports lmms-eval; :meth:`model_adapters.qwen3_vl_moe.Qwen3VLMoeAdapter.lmms_model` imports this module on first
use.

- ``generate_until``: greedy decoding; ``until`` strings cut the text.
- ``loglikelihood``: ``GenerationResult(text=(nll, is_greedy))`` per request, as lmms-eval 0.7.3's multiple-choice
  scoring expects (the lowest loss wins; see :mod:`model_adapters.deepseek_vl2.lmms_model`).
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from mcmoe_vl.calibration.image_text import ImageTextSample

from .qwen3_vl_moe import Qwen3VLMoeProcessor


class Qwen3VLMoeLMMS(lmms):
    """lmms-eval model around an in-memory Qwen3-VL-MoE and its processor (see the module docstring)."""

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
