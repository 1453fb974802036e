"""DeepSeek-MoE language models: ``DeepseekV2ForCausalLM`` and ``DeepseekV3ForCausalLM``.

These are the language part of DeepSeek-VL2. Both have routed experts in fused 3-D tensors, ``shared_experts``
and a first run of dense layers (``first_k_dense_replace``).

- V2 (``deepseek_v2``): softmax scores, greedy or group-limited top-k, weights times ``routed_scaling_factor``.
  transformers' V2 router never renormalises the top-k weights, whatever ``norm_topk_prob`` says; the spec describes
  what the model computes, and a config asking for renormalisation is reported.
- V3 (``deepseek_v3``): sigmoid scores, a correction bias used for selection only (``noaux_tc``), optional
  renormalisation, routed scaling.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from mcmoe_vl.moe.routing import RoutingSpec, Scoring

from .base import MoEAdapter
from .registry import ADAPTERS

log = logging.getLogger(__name__)


@ADAPTERS.register("deepseek_v2")
class DeepseekV2Adapter(MoEAdapter):
    name = "deepseek_v2"
    family = "DeepSeek-V2 MoE (DeepseekV2ForCausalLM): softmax routing, shared experts"
    moe_block_classes = ("DeepseekV2Moe",)
    shared_experts_attr = "shared_experts"

    def routing_spec(self, config: Any, block: nn.Module) -> RoutingSpec:
        if getattr(config, "norm_topk_prob", False):
            log.warning(
                "deepseek_v2 config sets norm_topk_prob=True but transformers' DeepseekV2 router does not "
                "renormalise; use DeepseekV3ForCausalLM for checkpoints that need it"
            )
        return RoutingSpec(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            scoring=Scoring.SOFTMAX,
            norm_topk_prob=False,
            routed_scaling_factor=float(config.routed_scaling_factor),
        )


@ADAPTERS.register("deepseek_v3")
class DeepseekV3Adapter(MoEAdapter):
    name = "deepseek_v3"
    family = "DeepSeek-V3 MoE (DeepseekV3ForCausalLM): sigmoid noaux_tc routing, shared experts"
    moe_block_classes = ("DeepseekV3MoE",)
    shared_experts_attr = "shared_experts"

    def routing_spec(self, config: Any, block: nn.Module) -> RoutingSpec:
        return RoutingSpec(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            scoring=Scoring.SIGMOID,
            has_correction_bias=True,
            norm_topk_prob=bool(config.norm_topk_prob),
            routed_scaling_factor=float(config.routed_scaling_factor),
        )
