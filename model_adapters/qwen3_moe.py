"""Qwen3-MoE (``Qwen3MoeForCausalLM``): the worked example of adding a family (see docs/adapters.md).

This family is registered the way a third-party plugin is: not by an import in ``model_adapters/__init__.py`` but
through the ``mcmoe_vl.adapters`` entry-point group in ``pyproject.toml``, which the registry loads on first use.

Softmax router, optional top-k renormalisation (``norm_topk_prob``), no shared experts, dense layers where
``mlp_only_layers`` or ``decoder_sparse_step`` say so (those are simply not MoE blocks).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mcmoe_vl.moe.routing import RoutingSpec, Scoring

from .base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    name = "qwen3_moe"
    family = "Qwen3-MoE (Qwen3MoeForCausalLM): softmax routing, optional renormalisation"
    moe_block_classes = ("Qwen3MoeSparseMoeBlock",)

    def routing_spec(self, config: Any, block: nn.Module) -> RoutingSpec:
        return RoutingSpec(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            scoring=Scoring.SOFTMAX,
            norm_topk_prob=bool(config.norm_topk_prob),
        )
