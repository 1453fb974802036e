"""DeepSeek-VL2 greedy generation with images and a KV cache equals step-by-step recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model_adapters.deepseek_vl2 import model_from_config
from model_adapters.deepseek_vl2.generation import greedy_generate
from model_adapters.deepseek_vl2.processing import DeepseekVL2Processor
from model_adapters.deepseek_vl2.tiny import tiny_official_config, tiny_tokenizer



MLA = dict(use_mla=True, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
VARIANTS = {
    "tiny_mha_greedy": {},
    "small_mla_greedy": MLA,
    "full_mla_noaux_tc": dict(MLA, q_lora_rank=48, topk_method="noaux_tc", scoring_func="sigmoid",
                              norm_topk_prob=True, routed_scaling_factor=2.0),
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _model(lang, seed=0):
    model = model_from_config(tiny_official_config(**lang), seed=seed)
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are far from ties
        for p in model.language.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model


def _convs():
    return (
        [[{"role": "user", "content": "<image>\nWhat is shown in the image?"}],
         [{"role": "user", "content": "Describe <image> briefly."}]],
        [[_image(200, 60, 1)], [_image(30, 30, 2)]],
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_generation_equals_recomputation(variant, tokenizer):
    model = _model(VARIANTS[variant])
    proc = DeepseekVL2Processor.from_config(tokenizer, model)
    convs, images = _convs()
    batch = proc(convs, images)
    n = 6
    cached = greedy_generate(model, batch, max_new_tokens=n, return_logits=True)
    fresh = greedy_generate(model, batch, max_new_tokens=n, use_cache=False, return_logits=True)
    assert cached.tokens.shape == (2, n)
    assert torch.equal(cached.tokens, fresh.tokens)
    for a, b in zip(cached.step_logits, fresh.step_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cached.tokens.unique().numel() > 1  # not a constant output
    # Independent check: one forward over prompt + generated tokens; each token is the argmax before it.
    full = dict(batch)
    full["input_ids"] = torch.cat([batch["input_ids"], cached.tokens], 1)
    full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(2, n, dtype=torch.long)], 1)
    full["images_seq_mask"] = torch.cat([batch["images_seq_mask"], torch.zeros(2, n, dtype=torch.bool)], 1)
    with torch.no_grad():
        logits = model(**full).logits
    s = batch["input_ids"].shape[1]
    for t in range(n):
        torch.testing.assert_close(logits[:, s - 1 + t], cached.step_logits[t], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[:, s - 1 : s - 1 + n].argmax(-1), cached.tokens)
    # Each sample alone (no padding) generates the same tokens.
    for i in range(2):
        single = proc([convs[i]], [images[i]])
        assert torch.equal(greedy_generate(model, single, max_new_tokens=n)[0], cached.tokens[i])


def test_generation_stops_at_eos(tokenizer):
    model = _model({})
    proc = DeepseekVL2Processor.from_config(tokenizer, model)
    convs, images = _convs()
    batch = proc(convs[:1], images[:1])
    first = greedy_generate(model, batch, max_new_tokens=1)[0, 0].item()
    out = greedy_generate(model, batch, max_new_tokens=5, eos_token_id=first, return_logits=True)
    assert out.tokens.shape == (1, 1) and bool(out.finished.all())
