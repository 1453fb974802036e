"""DeepSeek-VL2's language model: a DeepSeek MoE decoder built from transformers' DeepseekV2 / DeepseekV3 pieces.

With latent attention (``use_mla: true``) it is transformers' own ``DeepseekV2ForCausalLM`` (softmax routing) or
``DeepseekV3ForCausalLM`` (sigmoid ``noaux_tc``). With standard multi-head attention (``deepseek-vl2-tiny``) it is
the same families with :class:`DeepseekVL2MHAttention` and a rotary embedding over the whole head in place of latent
attention; everything else (MoE block, router, experts, norms, caching) stays transformers' code.
:func:`language_model_class` picks the class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PreTrainedModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as _v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as _v3

from mcmoe_vl.compat import pop_cache

# The eager attention kernel of the multi-head attention, at module level so that tools swapping attention
# implementations (e.g. the ODP token-importance capture) find it like in transformers' own modeling files.
eager_attention_forward = _v2.eager_attention_forward


class RotaryCosSin(nn.Module):
    """Rotary embedding over the whole head (Llama layout: ``cat(freqs, freqs)``), returned as ``(cos, sin)``."""

    def __init__(self, config: DeepseekV2Config | DeepseekV3Config) -> None:
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        theta = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class DeepseekVL2MHAttention(nn.Module):
    """Standard multi-head attention of ``deepseek-vl2-tiny`` (the official code uses transformers 4.38's
    ``LlamaAttention``): q/k/v/o projections, rotary on the whole head with ``rotate_half``, softmax scale
    ``head_dim**-0.5``, grouped key/value heads. Keys ``self_attn.{q,k,v,o}_proj``."""

    def __init__(self, config: DeepseekV2Config | DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, S, H)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = pop_cache(kwargs)  # ``cache`` from transformers 5.24, ``past_key_values`` before
        b, s, _ = hidden_states.shape
        shape = (b, s, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = _v3.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(out.reshape(b, s, -1).contiguous()), weights


def _mha_classes(family: str) -> tuple[type, type]:
    """(text model, causal LM) classes of a family with multi-head attention instead of latent attention.

    Everything but the attention and its rotary embedding is transformers' own DeepseekV2 / DeepseekV3 code
    (decoder layer forward, MoE block, router, fused experts, norms, caching, output recording).
    """
    m = _v2 if family == "deepseek_v2" else _v3
    p = "DeepseekV2" if family == "deepseek_v2" else "DeepseekV3"
    moe_cls = getattr(m, "DeepseekV2Moe" if family == "deepseek_v2" else "DeepseekV3MoE")
    mlp_cls, norm_cls = getattr(m, f"{p}MLP"), getattr(m, f"{p}RMSNorm")
    layer_base, model_base, lm_base = (getattr(m, f"{p}{n}") for n in ("DecoderLayer", "Model", "ForCausalLM"))

    class Layer(layer_base):
        def __init__(self, config: Any, layer_idx: int) -> None:
            GradientCheckpointingLayer.__init__(self)
            self.hidden_size = config.hidden_size
            self.self_attn = DeepseekVL2MHAttention(config, layer_idx)
            self.mlp = moe_cls(config) if layer_idx >= config.first_k_dense_replace else mlp_cls(config)
            self.input_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            self.post_attention_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)

    class TextModel(model_base):
        def __init__(self, config: Any) -> None:
            model_base.__mro__[1].__init__(self, config)  # the family's PreTrainedModel
            self.padding_idx = config.pad_token_id
            self.vocab_size = config.vocab_size
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
            self.layers = nn.ModuleList([Layer(config, i) for i in range(config.num_hidden_layers)])
            self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            self.rotary_emb = RotaryCosSin(config)
            self.gradient_checkpointing = False
            self.post_init()

    class ForCausalLM(lm_base):
        def __init__(self, config: Any) -> None:
            model_base.__mro__[1].__init__(self, config)
            self.model = TextModel(config)
            self.vocab_size = config.vocab_size
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

    tag = "V2" if family == "deepseek_v2" else "V3"
    for cls, name in ((Layer, "DecoderLayer"), (TextModel, "TextModel"), (ForCausalLM, "ForCausalLM")):
        cls.__name__ = cls.__qualname__ = f"DeepseekVL2MHA{tag}{name}"
    return TextModel, ForCausalLM


DeepseekVL2MHAV2TextModel, DeepseekVL2MHAV2ForCausalLM = _mha_classes("deepseek_v2")
DeepseekVL2MHAV3TextModel, DeepseekVL2MHAV3ForCausalLM = _mha_classes("deepseek_v3")


def language_model_class(text_config: DeepseekV2Config | DeepseekV3Config) -> type[PreTrainedModel]:
    """The causal-LM class for a text config from :func:`~.configuration.text_config_from_official`.

    - latent attention + softmax routing: transformers' ``DeepseekV2ForCausalLM``;
    - latent attention + sigmoid ``noaux_tc``: transformers' ``DeepseekV3ForCausalLM`` (exact with any n_group);
    - multi-head attention: the same families with :class:`DeepseekVL2MHAttention`.
    """
    v3 = isinstance(text_config, DeepseekV3Config)
    if getattr(text_config, "use_mla", None) is None:
        raise ValueError("text config lacks use_mla; build it with text_config_from_official()")
    if text_config.use_mla:
        return DeepseekV3ForCausalLM if v3 else DeepseekV2ForCausalLM
    return DeepseekVL2MHAV3ForCausalLM if v3 else DeepseekVL2MHAV2ForCausalLM


def build_language_model(text_config: DeepseekV2Config | DeepseekV3Config) -> PreTrainedModel:
    return language_model_class(text_config)(text_config)
