"""Routing as the common expert interface sees it: the router's description, one decision for T tokens, what
observers see, and what a routing override may return.

:class:`Routing` holds the model's own routing of a batch of tokens; :class:`RoutingDecision` is a keep-mask over
its top-k pairs (and optionally new weights), which :meth:`mcmoe_vl.moe.layer.MoELayer.forward` honours by never
computing the dropped pairs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .layer import MoELayer


class Scoring(str, enum.Enum):
    """How router logits become routing probabilities."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


@dataclass(frozen=True)
class RoutingSpec:
    """Static description of a MoE layer's router."""

    num_experts: int
    top_k: int
    scoring: Scoring = Scoring.SOFTMAX
    has_correction_bias: bool = False  # noaux_tc: a per-expert bias added to the scores for selection only
    norm_topk_prob: bool = False  # top-k weights renormalised to sum to 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"invalid routing: top_k={self.top_k} of num_experts={self.num_experts}")


@dataclass
class Routing:
    """One routing decision for T tokens.

    Slots of ``topk_idx`` are in the order the model produced them, which is not necessarily by decreasing weight
    (DeepSeek's routers use ``topk(sorted=False)``): use :meth:`top1_slot` rather than slot 0.
    """

    probs: torch.Tensor  # (T, E) float32 scores before top-k renormalisation (softmax or sigmoid)
    topk_idx: torch.Tensor  # (T, k) int64 selected experts
    topk_weight: torch.Tensor  # (T, k) the weights the model applies (after renormalisation and scaling)

    @property
    def topk_prob(self) -> torch.Tensor:
        """(T, k) the selected experts' probabilities before renormalisation."""
        return self.probs.gather(1, self.topk_idx)

    def top1_slot(self) -> torch.Tensor:
        """(T,) the slot holding each token's strongest selected expert."""
        return self.topk_weight.argmax(dim=-1)


@dataclass
class RoutingEvent:
    """What observers see for each forward of a MoE layer."""

    layer: MoELayer
    hidden: torch.Tensor  # (T, H) the block input, flattened over the leading dims
    batch_shape: tuple[int, ...]  # leading dims of the block input, e.g. (B, S)
    routing: Routing  # the model's own routing
    keep: torch.Tensor | None  # (T, k) bool: which (token, slot) pairs were computed; None = all
    weights: torch.Tensor  # (T, k) the weights actually applied


@dataclass
class RoutingDecision:
    """What a routing override returns: which top-k pairs to compute and with which weights."""

    keep: torch.Tensor  # (T, k) bool
    weights: torch.Tensor | None = None  # (T, k); None keeps the model's weights

    @classmethod
    def keep_only(cls, routing: Routing, keep: torch.Tensor, spec: RoutingSpec) -> RoutingDecision:
        """Keep the pairs in ``keep`` with the weights the model would give that smaller selection.

        Routers that renormalise the top-k (``norm_topk_prob``) renormalise over the kept experts (so a lone
        survivor of Mixtral's top-2 gets weight 1, like a top-1 router); others keep their weights unchanged.
        """
        keep = keep.bool()
        if spec.norm_topk_prob:
            p = routing.topk_prob * keep  # (T, k)
            w = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20) * spec.routed_scaling_factor
            weights = w.to(routing.topk_weight.dtype)
        else:
            weights = routing.topk_weight * keep
        return cls(keep=keep, weights=weights)


class RoutingOverride(Protocol):
    def __call__(self, layer: MoELayer, hidden: torch.Tensor, batch_shape: tuple[int, ...], routing: Routing) -> RoutingDecision | None: ...



RouterFn = Callable[[torch.Tensor], Routing]


def scores_from_logits(logits: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """Routing probabilities from router logits, in float32 like the models compute them."""
    if scoring is Scoring.SOFTMAX:
        return torch.softmax(logits.float(), dim=-1)
    return torch.sigmoid(logits.float())
