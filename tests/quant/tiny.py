"""Shared by the quant tests: a tiny random Mixtral with expert dims 128/256 so group 128 is real, and a weight with
correlated, outlier-heavy inputs for GPTQ checks."""

import math

import torch
from transformers import MixtralConfig, MixtralForCausalLM


def tiny_mixtral_q(seed: int = 0, *, experts: int = 4, layers: int = 2, dtype=torch.float32) -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=128,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM._from_config(cfg, dtype=dtype)  # rotary tables stay float32, as when loaded
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model.eval()


def batches(n: int = 2, seq: int = 24, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (1, seq), generator=g)} for _ in range(n)]


def correlated(r: int, c: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (r, c) and n inputs with correlated channels and three outlier channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(r, c, generator=g) * 0.05
    z = torch.randn(n, c, generator=g)
    lower = torch.tril(torch.randn(c, c, generator=g)) / math.sqrt(c) + torch.eye(c)
    x = z @ lower.t()
    x[:, :3] *= 10  # outlier channels
    return w, x
