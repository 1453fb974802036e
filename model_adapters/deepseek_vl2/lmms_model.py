"""An lmms-eval model serving DeepSeek-VL2 from memory: the original or a compressed model (e.g. with quantized
experts installed through the expert interface), without writing it to disk.

lmms-eval 0.7 finds models by name only in its own registry, so hand an instance to the evaluator::

    from lmms_eval import evaluator
    from model_adapters.deepseek_vl2.lmms_model import DeepseekVL2LMMS

    lm = DeepseekVL2LMMS(model, processor)              # or DeepseekVL2LMMS.from_pretrained("path/or/hub-id")
    results = evaluator.simple_evaluate(model=lm, tasks=["mmbench_en_dev"], batch_size=1)

- ``generate_until``: the ``deepseek`` chat template with one ``<image>`` per visual before the question, greedy
  decoding with a KV cache (``max_new_tokens``, ``until`` strings; sampling requests are decoded greedily), the
  text cut at the first ``until`` string.
- ``loglikelihood``: for multiple-choice tasks, the *negative* summed log-probability of the continuation's tokens
  after the prompt (prompt ids + continuation ids), and whether each was the greedy choice. lmms-eval 0.7.3 picks the
  answer by ``argmin`` over these values (its models return a loss, e.g. llava's ``outputs.loss``), so the value is a
  loss: lower is better. Each result is a
  ``GenerationResult`` whose ``text`` is the ``(nll, is_greedy)`` tuple: lmms-eval 0.7.3's evaluator turns any
  other non-string model output into its ``str`` (``unwrap_generation_output``), which breaks the
  ``multiple_choice`` scoring; ``GenerationResult.text`` is passed through as it is. :meth:`DeepseekVL2LMMS.score`
  gives the plain tuple.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm
from transformers import DynamicCache

from .generation import greedy_generate
from .modeling import DeepseekVL2ForCausalLM
from .processing import DeepseekVL2Processor, ProcessedSample

log = logging.getLogger(__name__)


class DeepseekVL2LMMS(lmms):
    """lmms-eval model around an in-memory :class:`DeepseekVL2ForCausalLM` and its processor."""

    is_simple = True

    def __init__(
        self,
        model: DeepseekVL2ForCausalLM,
        processor: DeepseekVL2Processor,
        *,
        batch_size: int = 1,
        max_new_tokens: int = 128,
        system_prompt: str = "",
    ) -> None:
        super().__init__()
        if not isinstance(processor, DeepseekVL2Processor):
            raise TypeError(f"processor must be a DeepseekVL2Processor, got {type(processor).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str = "cuda" if torch.cuda.is_available() else "cpu",
        **kw: Any,
    ) -> DeepseekVL2LMMS:
        """From an official checkpoint directory (or a Hub id, downloaded with ``huggingface_hub``)."""
        from pathlib import Path

        from transformers import AutoTokenizer

        from .loading import load_official

        local = Path(path)
        if not local.is_dir():
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        model = load_official(local, dtype=dtype, device=device)
        processor = DeepseekVL2Processor.from_config(AutoTokenizer.from_pretrained(str(local)), model)
        return cls(model, processor, **kw)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # -- request helpers ----------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        out = []
        for v in visuals:
            if v is None:
                continue
            if not hasattr(v, "convert"):
                raise TypeError(f"{task}: only images are supported, got a {type(v).__name__} visual")
            out.append(v.convert("RGB"))
        return out

    def _prompt(self, context: str, n_images: int) -> str:
        tag = self.processor.image_token
        text = context if context.count(tag) == n_images else tag * n_images + "\n" + context
        return self.processor.format_conversation([{"role": "user", "content": text}], self.system_prompt)

    def _to_model(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.get_input_embeddings().weight.dtype
        return {k: (v.to(self.device, dtype) if k == "images" else v.to(self.device)) for k, v in batch.items()}

    # -- lmms-eval API ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``GenerationResult(text=(negative log-likelihood, is_greedy))`` per request (module docstring).

        The requests of one question (same task, document and context: the choices of a multiple-choice item) are
        scored together by :meth:`score_choices`: one forward over the prompt and its images, then one batched
        forward over the continuations from the prompt's cache."""
        conts: list[str] = []
        items: dict[tuple[str, str, int, str], list[int]] = {}
        for i, req in enumerate(requests):
            context, doc_to_target, _, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            conts.append(str(doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)))
            items.setdefault((task, split, doc_id, context), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        for (task, split, doc_id, context), idxs in tqdm(items.items(), desc="loglikelihood", disable=len(items) < 8):
            images = self._visuals(requests[idxs[0]].args[2], doc_id, task, split)
            scored = self.score_choices(self._prompt(context, len(images)), [conts[i] for i in idxs], images)
            for i, (logprob, greedy) in zip(idxs, scored, strict=True):
                # text carries the (nll, is_greedy) tuple through the evaluator, which takes the argmin (docstring)
                results[i] = GenerationResult(text=(-logprob, greedy),  # type: ignore[arg-type]
                                              token_counts=TokenCounts(output_tokens=0))
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def score_choices(self, prompt: str, continuations: Sequence[str],
                      images: Sequence[Any] = ()) -> list[tuple[float, bool]]:
        """:meth:`score` of each continuation after one shared prompt, with the prompt (and its images) run once.

        The prompt's forward fills a key/value cache and gives the first continuation token's distribution; the
        continuations' remaining tokens run as one right-padded batch from copies of that cache. Equal to
        :meth:`score` per continuation up to float round-off."""
        ids = [torch.tensor(self.tokenizer.encode(c, add_special_tokens=False), dtype=torch.long)
               for c in continuations]
        for c, t in zip(continuations, ids, strict=True):
            if t.numel() == 0:
                raise ValueError(f"the continuation {c!r} encodes to no tokens")
        sample = self.processor.process_one(prompt=prompt, images=list(images))
        batch = self._to_model(self.processor.collate([sample]))
        cache = DynamicCache(config=self.model.config.text_config)
        first = self.model(**batch, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()  # (V,)
        longest = max(t.numel() for t in ids)
        rest = None
        if longest > 1:  # the tokens after the first, for every continuation at once
            k = len(ids)
            cache.batch_repeat_interleave(k)
            inp = torch.zeros(k, longest - 1, dtype=torch.long)
            mask = torch.zeros(k, longest - 1, dtype=torch.long)
            for row, t in enumerate(ids):
                inp[row, : t.numel() - 1] = t[:-1]
                mask[row, : t.numel() - 1] = 1
            mask = torch.cat([batch["attention_mask"].cpu().expand(k, -1), mask], dim=1)
            rest = self.model(input_ids=inp.to(self.device), attention_mask=mask.to(self.device), cache=cache,
                              use_cache=True).logits.float()  # (K, longest - 1, V)
        out = []
        for row, t in enumerate(ids):
            logits = first[None] if t.numel() == 1 else torch.cat([first[None], rest[row, : t.numel() - 1]])
            target = t.to(logits.device)
            logp = torch.log_softmax(logits, dim=-1)
            out.append((float(logp.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())))
        return out

    @torch.no_grad()
    def score(self, prompt: str, continuation: str, images: Sequence[Any] = ()) -> tuple[float, bool]:
        """(sum of log p(continuation tokens | prompt), every continuation token was the argmax)."""
        sample = self.processor.process_one(prompt=prompt, images=list(images))
        cont_ids = torch.tensor(self.tokenizer.encode(continuation, add_special_tokens=False), dtype=torch.long)
        if cont_ids.numel() == 0:
            raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
        n_prompt = sample.input_ids.numel()
        full = ProcessedSample(
            input_ids=torch.cat([sample.input_ids, cont_ids]),
            images=sample.images,
            images_spatial_crop=sample.images_spatial_crop,
            images_seq_mask=torch.cat([sample.images_seq_mask, torch.zeros(cont_ids.numel(), dtype=torch.bool)]),
            num_image_tokens=sample.num_image_tokens,
            prompt=prompt + continuation,
        )
        batch = self._to_model(self.processor.collate([full]))
        logits = self.model(**batch).logits[0, n_prompt - 1 : -1].float()  # (n_cont, V) predicting each cont token
        logp = torch.log_softmax(logits, dim=-1)
        target = cont_ids.to(logp.device)
        total = float(logp.gather(1, target[:, None]).sum())
        greedy = bool((logits.argmax(-1) == target).all())
        return total, greedy

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        # Requests with the same generation settings are batched (left padding).
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=len(requests) < 8)
        for idxs in groups.values():
            gen_kwargs = dict(requests[idxs[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0:
                log.warning("sampling was requested (%s); decoding greedily", gen_kwargs)
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                samples = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    images = self._visuals(doc_to_visual, doc_id, task, split)
                    samples.append(self.processor.process_one(prompt=self._prompt(context, len(images)),
                                                              images=images))
                batch = self._to_model(self.processor.collate(samples))
                tokens = greedy_generate(self.model, batch, max_new_tokens=max_new,
                                         eos_token_id=self.tokenizer.eos_token_id,
                                         pad_token_id=self.tokenizer.eos_token_id)
                for i, row in zip(chunk, tokens.tolist(), strict=True):
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text.strip()
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return [o if o is not None else "" for o in out]

    def clean(self) -> None:
        """The evaluator calls this after a run; lmms' default deletes the model from the instance. The model is the
        caller's (it may be evaluated again, or compressed further), so only caches are freed."""
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the DeepSeek-VL2 lmms model")
