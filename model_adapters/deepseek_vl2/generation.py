"""Greedy generation for DeepSeek-VL2 with a KV cache.

The prompt (text with image embeddings placed) runs once and fills a ``DynamicCache``; each further step feeds
only the previous token. Left-padded batches are handled with the attention mask (positions count real tokens).
A sequence that produced ``eos`` keeps producing ``pad`` (or ``eos`` when there is no pad id).

Example::

    batch = processor([conversation], [[image]])
    new_tokens = greedy_generate(model, batch, max_new_tokens=64, eos_token_id=tok.eos_token_id)
    text = tok.batch_decode(new_tokens, skip_special_tokens=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .modeling import DeepseekVL2ForCausalLM


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, n) new tokens
    step_logits: list[torch.Tensor]  # n x (B, V): the logits each token was chosen from
    finished: torch.Tensor  # (B,) bool: produced eos


@torch.no_grad()
def greedy_generate(
    model: DeepseekVL2ForCausalLM,
    batch: Mapping[str, torch.Tensor],
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    return_logits: bool = False,
) -> torch.Tensor | GenerationOutput:
    """Greedy decoding of ``max_new_tokens`` tokens after each prompt of ``batch`` (the processor's output).

    ``use_cache=False`` recomputes the whole sequence at every step (the reference the cached path must equal).
    Returns the new tokens (B, n), or a :class:`GenerationOutput` when ``return_logits``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.get_input_embeddings().weight.device
    eos, fill = _stop_tokens(eos_token_id, pad_token_id)
    eos_t = torch.tensor(sorted(eos), device=device, dtype=torch.long)
    embeds, mask = _prompt_embeds(model, batch, device)  # (B, S, D), images placed once; (B, S)
    b = embeds.shape[0]

    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out_tokens: list[torch.Tensor] = []
    out_logits: list[torch.Tensor] = []
    cache = DynamicCache(config=model.config.text_config) if use_cache else None
    step_embeds = embeds
    for _ in range(max_new_tokens):
        # The cache is updated in place: the same object serves every step.
        out = model(inputs_embeds=step_embeds, attention_mask=mask, cache=cache, use_cache=use_cache, logits_to_keep=1)
        logits = out.logits[:, -1].float()  # (B, V)
        nxt = logits.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, fill), nxt)
        out_tokens.append(nxt)
        out_logits.append(logits)
        if eos:
            finished |= torch.isin(nxt, eos_t)
            if bool(finished.all()):
                break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
        new_embed = model.get_input_embeddings()(nxt[:, None])  # (B, 1, D)
        if use_cache:
            step_embeds = new_embed
        else:
            embeds = torch.cat([embeds, new_embed], dim=1)
            step_embeds = embeds
    tokens = torch.stack(out_tokens, dim=1)
    if return_logits:
        return GenerationOutput(tokens, out_logits, finished)
    return tokens


def _stop_tokens(eos_token_id: int | list[int] | None, pad_token_id: int | None) -> tuple[set[int], int]:
    """The eos ids, and the token a finished sequence keeps producing (pad, else the smallest eos id, else 0)."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    fill = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    return eos, fill


def _prompt_embeds(
    model: DeepseekVL2ForCausalLM, batch: Mapping[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' input embeddings (B, S, D) with the images placed, and their attention mask (B, S) (all ones
    when the batch has none), on ``device``."""
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    images = batch.get("images")
    seq_mask = batch.get("images_seq_mask")
    crops = batch.get("images_spatial_crop")
    if images is not None:
        images, crops = images.to(device), crops.to(device)
        seq_mask = seq_mask.to(device)
    return model.prepare_inputs_embeds(ids, images, seq_mask, crops), mask
