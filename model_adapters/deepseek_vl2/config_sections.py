"""The three sections of DeepSeek-VL2's official ``config.json``, each parsed and checked on its own.

- :class:`LanguageConfig` (``language_config``): the DeepSeek-V2-style MoE decoder, its attention (``use_mla``) and
  routing (``topk_method``, ``scoring_func``);
- :class:`VisionConfig` (``vision_config``): the timm-style SigLIP ViT;
- :class:`ProjectorConfig` (``projector_config``): ``downsample_mlp_gelu``.

Each refuses, with an error naming the key and the valid values, what the official code would compute differently
from this port. :class:`~.configuration.OfficialConfig` puts them together and checks them against each other.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

class Attention(str, enum.Enum):
    MHA = "mha"  # standard multi-head attention with rotary embeddings on the whole head (Llama-style)
    MLA = "mla"  # DeepSeek multi-head latent attention


class TopkMethod(str, enum.Enum):
    GREEDY = "greedy"
    GROUP_LIMITED_GREEDY = "group_limited_greedy"
    NOAUX_TC = "noaux_tc"


class ScoringFunc(str, enum.Enum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class Section(BaseModel):
    """One section of the official config: unknown keys fail, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LanguageConfig(Section):
    """``language_config`` with the official ``DeepseekV2Config`` defaults."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: TopkMethod = TopkMethod.GREEDY
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: ScoringFunc = ScoringFunc.SOFTMAX
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True

    @property
    def attention(self) -> Attention:
        return Attention.MLA if self.use_mla else Attention.MHA

    @property
    def routing_family(self) -> str:
        """``deepseek_v2`` (softmax, greedy or group-limited) or ``deepseek_v3`` (sigmoid ``noaux_tc``)."""
        return "deepseek_v3" if self.topk_method is TopkMethod.NOAUX_TC else "deepseek_v2"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        """The official rule: MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th layer."""
        return (
            self.n_routed_experts is not None and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
        )

    @model_validator(mode="after")
    def _check(self) -> LanguageConfig:
        self._check_attention("language_config")
        self._check_routing("language_config")
        if self.tie_word_embeddings:
            raise ValueError("language_config: tie_word_embeddings=true is not supported; valid: false")
        if self.hidden_act != "silu":
            raise ValueError(f"language_config: hidden_act={self.hidden_act!r} is not supported; valid: silu")
        return self

    def _check_attention(self, where: str) -> None:
        """Head counts, then the attention keys against ``use_mla`` (which decides, as in the official decoder
        layer)."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{where}: hidden_size {self.hidden_size} not divisible by num_attention_heads")
        kvh = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kvh:
            raise ValueError(f"{where}: num_attention_heads not divisible by num_key_value_heads={kvh}")
        if self.use_mla:
            if self.kv_lora_rank is None or self.kv_lora_rank <= 0:
                raise ValueError(f"{where}: use_mla=true needs a positive kv_lora_rank, got {self.kv_lora_rank}")
            if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2 or self.v_head_dim <= 0:
                raise ValueError(
                    f"{where}: latent attention needs an even qk_rope_head_dim > 0 and v_head_dim > 0, got "
                    f"{self.qk_rope_head_dim}, {self.v_head_dim}"
                )
        else:
            if self.kv_lora_rank is not None or self.q_lora_rank is not None:
                raise ValueError(
                    f"{where}: use_mla=false (standard multi-head attention) but kv_lora_rank={self.kv_lora_rank}, "
                    f"q_lora_rank={self.q_lora_rank} describe latent attention; set them to null or use_mla=true"
                )
            if self.head_dim % 2:
                raise ValueError(f"{where}: multi-head attention needs an even head dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            raise ValueError(
                f"{where}: rope_scaling={self.rope_scaling} is not supported (no DeepSeek-VL2 checkpoint uses it); "
                "valid: null"
            )

    def _check_routing(self, where: str) -> None:
        """Expert counts and layer frequency, then the router keys against ``topk_method``."""
        if self.n_routed_experts is None:
            raise ValueError(f"{where}: n_routed_experts is required (DeepSeek-VL2 language models are MoE)")
        if not self.num_experts_per_tok or not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"{where}: num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.n_routed_experts}"
            )
        if self.moe_layer_freq != 1:
            raise ValueError(f"{where}: moe_layer_freq={self.moe_layer_freq} is not supported; valid: 1")
        if self.topk_method is TopkMethod.NOAUX_TC:
            self._check_sigmoid_routing(where)
        else:
            self._check_softmax_routing(where)

    def _check_sigmoid_routing(self, where: str) -> None:
        """``noaux_tc``: sigmoid scores with a correction bias, experts in groups."""
        if self.scoring_func is not ScoringFunc.SIGMOID:
            raise ValueError(
                f"{where}: topk_method=noaux_tc is the sigmoid router with a correction bias; scoring_func must "
                f"be 'sigmoid', got {self.scoring_func.value!r}"
            )
        g, tg = self.n_group or 1, self.topk_group or 1
        if self.n_routed_experts % g or not 1 <= tg <= g or self.n_routed_experts // g < 2:
            raise ValueError(f"{where}: invalid expert groups n_group={self.n_group}, topk_group={self.topk_group}")

    def _check_softmax_routing(self, where: str) -> None:
        """``greedy`` / ``group_limited_greedy``: softmax scores, no renormalisation of the top-k weights."""
        if self.scoring_func is not ScoringFunc.SOFTMAX:
            raise ValueError(
                f"{where}: topk_method={self.topk_method.value!r} with scoring_func="
                f"{self.scoring_func.value!r} is not supported; valid: softmax (or topk_method=noaux_tc with "
                "sigmoid)"
            )
        if self.norm_topk_prob and self.num_experts_per_tok > 1:
            raise ValueError(
                f"{where}: norm_topk_prob=true with softmax {self.topk_method.value} routing is not supported "
                "(no DeepSeek-VL2 checkpoint uses it); valid: false"
            )
        if self.topk_method is TopkMethod.GROUP_LIMITED_GREEDY:
            g, tg = self.n_group or 0, self.topk_group or 0
            if g < 1 or self.n_routed_experts % g or not 1 <= tg <= g:
                raise ValueError(
                    f"{where}: group_limited_greedy needs n_group dividing n_routed_experts and "
                    f"1 <= topk_group <= n_group, got {self.n_group}, {self.topk_group}"
                )


class VisionConfig(Section):
    """``vision_config``: the official timm-style SigLIP ViT."""

    model_name: str = "siglip_so400m_patch14_384"
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0

    @property
    def intermediate_size(self) -> int:
        return int(self.width * self.mlp_ratio)  # timm: Mlp(hidden_features=int(dim * mlp_ratio))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        where = "vision_config"
        if not self.model_name.startswith("siglip"):
            raise ValueError(f"{where}: model_name={self.model_name!r} is not supported; valid: siglip_*")
        if not self.ignore_head or self.class_token or self.num_classes:
            raise ValueError(
                f"{where}: only the headless tower is supported (ignore_head=true, class_token=false, "
                f"num_classes=0), got {self.ignore_head}, {self.class_token}, {self.num_classes}"
            )
        if self.global_pool not in ("map", "", "avg", "token"):
            raise ValueError(f"{where}: unknown global_pool {self.global_pool!r}")
        # The patch grid is image_size // patch_size (384 px / 14 px: 27, the last 6 pixels unused by the conv).
        if self.image_size < self.patch_size or self.width % self.heads:
            raise ValueError(
                f"{where}: need image_size >= patch_size and width divisible by heads, got {self.image_size}, "
                f"{self.patch_size}, {self.width}, {self.heads}"
            )
        return self


class ProjectorConfig(Section):
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    @model_validator(mode="after")
    def _check(self) -> ProjectorConfig:
        if self.projector_type != "downsample_mlp_gelu":
            raise ValueError(
                f"projector_config: projector_type={self.projector_type!r} is not supported; valid: "
                "downsample_mlp_gelu"
            )
        if self.token_pooling:
            raise ValueError("projector_config: token_pooling=true is not supported; valid: false")
        if self.depth < 1 or self.downsample_ratio < 1 or self.mlp_ratio < 1:
            raise ValueError("projector_config: depth, mlp_ratio and downsample_ratio must be >= 1")
        return self

