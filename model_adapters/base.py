"""The adapter base: a small typed description of a MoE model family plus a few hooks.

An adapter tells the rest of the package where a model's decoder layers and MoE blocks are and how its router
scores experts; :meth:`MoEAdapter.moe_layers` turns that into :class:`mcmoe_vl.moe.MoELayer` views. Families built
the transformers-5 way (a router module ``gate`` returning ``(logits, topk_weights, topk_indices)``, experts in
fused 3-D tensors ``experts.gate_up_proj`` / ``experts.down_proj``, optional ``shared_experts``) need only the
class attributes; others override the hooks. See ``docs/adapters.md`` for a worked example.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mcmoe_vl.moe.interface import (
    ExpertStorage,
    FusedExpertStorage,
    ModuleListExpertStorage,
    MoELayer,
    Routing,
    RoutingSpec,
    Scoring,
    scores_from_logits,
)


class MoEAdapter:
    """Describe one model family. Subclass, set the class attributes, register under the HF ``model_type``.

    Class attributes:
        name: the Hugging Face ``model_type`` this adapter serves (also its registry key).
        family: a human-readable family name.
        moe_block_classes: class names of the MoE blocks (a layer whose ``mlp_attr`` module has one of these
            names is a MoE layer; other layers are dense).
        mlp_attr / attention_attr: attribute names of the feed-forward block and the self-attention in a decoder
            layer.
        router_attr / experts_attr / shared_experts_attr: attribute names inside the MoE block
            (``shared_experts_attr = None`` when the family has none).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    moe_block_classes: ClassVar[tuple[str, ...]] = ()
    mlp_attr: ClassVar[str] = "mlp"
    attention_attr: ClassVar[str] = "self_attn"
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    shared_experts_attr: ClassVar[str | None] = None

    # -- where things are --------------------------------------------------------------------------------------
    def text_config(self, model: nn.Module) -> Any:
        """The language model's config (for VLMs, the text part)."""
        cfg = model.config
        return getattr(cfg, "text_config", None) or cfg

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (the module holding ``layers``, the embeddings and the final norm)."""
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
        if hasattr(model, "layers"):
            return model
        raise TypeError(f"{type(model).__name__}: cannot find the decoder layers; override language_model()")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def lm_head(self, model: nn.Module) -> nn.Module | None:
        return getattr(model, "lm_head", None)

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        block = getattr(layer, self.mlp_attr, None)
        return block if block is not None and type(block).__name__ in self.moe_block_classes else None

    def attention(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, self.attention_attr, None)

    # -- how the router and experts work -----------------------------------------------------------------------
    def routing_spec(self, config: Any, block: nn.Module) -> RoutingSpec:
        raise NotImplementedError(f"{type(self).__name__} must implement routing_spec()")

    def router(self, block: nn.Module, spec: RoutingSpec):
        """A function (T, H) -> :class:`Routing` computing exactly what the model computes.

        The default calls the block's own router module, which returns ``(logits, topk_weights, topk_indices)``,
        and derives the probabilities from the logits with the spec's scoring.
        """
        gate = getattr(block, self.router_attr)

        def route(x: torch.Tensor) -> Routing:
            logits, weights, idx = gate(x)
            return Routing(probs=scores_from_logits(logits, spec.scoring), topk_idx=idx, topk_weight=weights)

        return route

    def expert_storage(self, block: nn.Module) -> ExpertStorage:
        experts = getattr(block, self.experts_attr)
        # An experts module that knows its own storage (e.g. a quantized one) describes itself.
        provider = getattr(experts, "as_expert_storage", None)
        if callable(provider):
            return provider()
        if isinstance(experts, nn.ModuleList):
            return ModuleListExpertStorage(experts)
        return FusedExpertStorage(experts)

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.shared_experts_attr) if self.shared_experts_attr else None

    # -- the views ---------------------------------------------------------------------------------------------
    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """One :class:`MoELayer` per MoE block, in layer order."""
        config = self.text_config(model)
        prefix = self._layers_path(model)
        out: list[MoELayer] = []
        for i, layer in enumerate(self.decoder_layers(model)):
            block = self.moe_block(layer)
            if block is None:
                continue
            spec = self.routing_spec(config, block)
            out.append(
                MoELayer(
                    index=i,
                    path=f"{prefix}.{i}.{self.mlp_attr}",
                    block=block,
                    spec=spec,
                    router=self.router(block, spec),
                    storage=self.expert_storage(block),
                    shared_experts=self.shared_experts(block),
                    attention=self.attention(layer),
                )
            )
        return out

    def _layers_path(self, model: nn.Module) -> str:
        layers = self.decoder_layers(model)
        for name, mod in model.named_modules():
            if mod is layers:
                return name
        return "layers"

    def describe(self) -> str:
        return f"{self.name}: {self.family}" if self.family else self.name


def check_scoring(value: str, *, where: str) -> Scoring:
    try:
        return Scoring(value)
    except ValueError:
        raise ValueError(f"{where}: unsupported scoring function {value!r}; valid: softmax, sigmoid") from None
