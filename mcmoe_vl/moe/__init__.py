"""The common expert interface and layer-by-layer execution.

Routing (:mod:`.routing`), expert storage (:mod:`.storage`), one MoE layer (:mod:`.layer`), the interface over a
whole model (:mod:`.interface`) and layer-by-layer execution (:mod:`.layerwise`).
"""

from .interface import ExpertInterface, LayerSource, ObserverHandle
from .layer import MoELayer
from .routing import (
    Routing,
    RoutingDecision,
    RoutingEvent,
    RoutingOverride,
    RoutingSpec,
    Scoring,
    scores_from_logits,
)
from .storage import ExpertStorage, ExpertWeights, FusedExpertStorage, ModuleListExpertStorage

__all__ = [
    "ExpertInterface",
    "ExpertStorage",
    "ExpertWeights",
    "FusedExpertStorage",
    "LayerSource",
    "ModuleListExpertStorage",
    "MoELayer",
    "ObserverHandle",
    "Routing",
    "RoutingDecision",
    "RoutingEvent",
    "RoutingOverride",
    "RoutingSpec",
    "Scoring",
    "scores_from_logits",
]
