"""Helpers of the bad-input battery (a module of its own: test files import it by name)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_mixtral(d: Path, *, seed: int = 0, scale: float = 0.1) -> Path:
    """A tiny random Mixtral checkpoint with the byte tokenizer (what `mcmoe-vl calibrate` reads)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from mcmoe_vl.data.tokenizer import VOCAB_SIZE, byte_tokenizer

    cfg = MixtralConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, attn_implementation="eager")
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(d)
    byte_tokenizer(model_max_length=128).save_pretrained(d)
    return d
