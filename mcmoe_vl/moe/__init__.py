"""The common expert interface (see :mod:`mcmoe_vl.moe.interface`) and layer-by-layer execution."""

from .interface import (
    ExpertInterface,
    ExpertStorage,
    ExpertWeights,
    FusedExpertStorage,
    ModuleListExpertStorage,
    MoELayer,
    ObserverHandle,
    Routing,
    RoutingDecision,
    RoutingEvent,
    RoutingSpec,
    Scoring,
    scores_from_logits,
)

__all__ = [
    "ExpertInterface",
    "ExpertStorage",
    "ExpertWeights",
    "FusedExpertStorage",
    "ModuleListExpertStorage",
    "MoELayer",
    "ObserverHandle",
    "Routing",
    "RoutingDecision",
    "RoutingEvent",
    "RoutingSpec",
    "Scoring",
    "scores_from_logits",
]
