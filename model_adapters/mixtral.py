"""Mixtral (``MixtralForCausalLM``): softmax router, top-2 of 8, top-k weights renormalised, no shared experts."""

from __future__ import annotations

from typing import Any

from torch import nn

from mcmoe_vl.moe.routing import RoutingSpec, Scoring

from .base import MoEAdapter
from .registry import ADAPTERS


@ADAPTERS.register("mixtral")
class MixtralAdapter(MoEAdapter):
    name = "mixtral"
    family = "Mixtral (MixtralForCausalLM): 8 experts, top-2, softmax, renormalised"
    moe_block_classes = ("MixtralSparseMoeBlock",)
    # hub checkpoints keep the pre-transformers-5 names: block_sparse_moe, experts w1 (gate), w3 (up), w2 (down)
    hub_renames = ((".mlp.", ".block_sparse_moe."),)
    hub_expert_names = ("w1", "w3", "w2")

    def routing_spec(self, config: Any, block: nn.Module) -> RoutingSpec:
        return RoutingSpec(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            scoring=Scoring.SOFTMAX,
            norm_topk_prob=True,
        )
