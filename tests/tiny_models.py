"""Tiny random instances of the real model classes, shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)


def _init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Random but not vacuous: routers with spread so routing differs between tokens, experts non-zero.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
            elif "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model.eval()


def tiny_mixtral(seed: int = 0, *, experts: int = 8, top_k: int = 2, layers: int = 2) -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=128,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _init(MixtralForCausalLM(cfg), seed)


def tiny_deepseek_v2(seed: int = 0) -> DeepseekV2ForCausalLM:
    cfg = DeepseekV2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, routed_scaling_factor=1.5, topk_method="greedy", n_group=1, topk_group=1,
        max_position_embeddings=128, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _init(DeepseekV2ForCausalLM(cfg), seed)


def tiny_deepseek_v3(seed: int = 0) -> DeepseekV3ForCausalLM:
    cfg = DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, routed_scaling_factor=2.0, n_group=1, topk_group=1, norm_topk_prob=True,
        max_position_embeddings=128, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _init(DeepseekV3ForCausalLM(cfg), seed)


def tiny_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    cfg = Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=128, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _init(Qwen3MoeForCausalLM(cfg), seed)


def tiny_deepseek_vl2(seed: int = 0):
    """DeepSeek-VL2 (tiny variant: multi-head attention, greedy softmax), official layout, 3 layers, 8 experts."""
    from model_adapters.deepseek_vl2 import model_from_config
    from model_adapters.deepseek_vl2.tiny import tiny_official_config

    torch.manual_seed(seed)
    return _init(model_from_config(tiny_official_config(), attn_implementation="eager"), seed)


QWEN3_VL_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>")  # ids 0..6 of the tiny tokenizer


def tiny_qwen3_vl_tokenizer():
    """An offline byte-level tokenizer (272 ids) whose special tokens have the ids the tiny Qwen3-VL-MoE expects."""
    from model_adapters.deepseek_vl2.tiny import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=272, special_tokens=QWEN3_VL_SPECIAL)
    tok.pad_token = "<|endoftext|>"
    return tok


def tiny_qwen3_vl_moe(seed: int = 0):
    """Qwen3-VL-MoE: a 2-layer MoE language model (8 experts, top-2) behind a 2-block vision encoder (4-px
    patches, 2x2 merge); token ids match :func:`tiny_qwen3_vl_tokenizer`. As in every released checkpoint, the
    text model adds "deepstack" features (of both vision blocks) at the image positions after decoder layers 0 and 1."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    cfg = Qwen3VLMoeConfig(
        text_config=dict(vocab_size=272, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [1, 1, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4,
    )
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _init(Qwen3VLMoeForConditionalGeneration(cfg), seed)


TINY_BUILDERS = {
    "mixtral": tiny_mixtral,
    "deepseek_v2": tiny_deepseek_v2,
    "deepseek_v3": tiny_deepseek_v3,
    "qwen3_moe": tiny_qwen3_moe,
    "deepseek_vl_v2": tiny_deepseek_vl2,
    "qwen3_vl_moe": tiny_qwen3_vl_moe,
}
