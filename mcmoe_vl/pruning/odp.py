"""ODP: online dynamic pruning (MC-MoE paper section 3.3, METHOD.md section 6).

The weight-ratio rule (paper Eq. 5) and its top-k generalisation: with the applied routing weights of a token's
selected experts and ``w_top1`` the largest of them, drop selected expert ``e`` (never the top-1) when::

    w_e / w_top1 < mu_layer

For Mixtral's top-2 this is "drop the second expert when w1 / w0 < mu". ``mu`` per layer is the median of the
ratio over the calibration tokens' selected non-top-1 pairs, or the quantile that removes a requested fraction of
all top-k (token, expert) pairs (:func:`threshold_from_ratios`).

Surviving weights follow the router (:meth:`mcmoe_vl.moe.RoutingDecision.keep_only`): routers that renormalise
their top-k (Mixtral, Qwen3-MoE, DeepSeek-V3 with ``norm_topk_prob``) renormalise over the kept experts, so a lone
survivor of Mixtral's top-2 gets weight 1 as in the paper; routers that do not renormalise (DeepSeek-V2) keep each
survivor's weight, as the same router with a smaller k would. A token whose pairs are all kept gets the model's own
weights bit for bit.

Token protection (paper Eq. 6, :mod:`.importance`): in prefill the top ``protect_ratio`` tokens by importance keep
all their experts; single-token decoding steps apply the ratio rule alone.

Example::

    iface = ExpertInterface(model, adapter)       # adapter = model_adapters.get_adapter(model)
    thresholds = fit_odp(model, batches, ODPConfig(prune_rate=0.15, protect_ratio=0.02), iface=iface)
    with iface, ODPRule(iface, thresholds):
        model(**inputs)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mcmoe_vl.moe.interface import ExpertInterface
from mcmoe_vl.moe.layer import MoELayer
from mcmoe_vl.moe.layerwise import iterate_layers
from mcmoe_vl.moe.routing import Routing, RoutingDecision, RoutingEvent

from .importance import AttentionColumnCapture, ColumnStats, ProtectScope, protection_mask, token_importance
from .method import PruningMethod

log = logging.getLogger(__name__)


class ODPConfig(BaseModel):
    """How ODP thresholds are fitted and applied.

    Threshold (one of): ``mu`` a fixed value for every layer; ``prune_rate`` the fraction of all top-k (token,
    expert) pairs to remove on the calibration tokens (the ratio quantile ``prune_rate * k / (k - 1)`` per layer);
    else the ``quantile`` of the ratio distribution (0.5: the paper's median).
    ``layers``: decoder layer indices where ODP is on (None: every MoE layer).
    ``protect_ratio``: fraction of tokens protected in prefill (0.02 in the paper; 0 = the ratio rule alone);
    ``protect_scope``: top fraction per sequence (default; independent of batching) or per batch.
    ``attention_chunk``: queries per chunk when column sums are recomputed from Q and K.

    Example: ``ODPConfig(prune_rate=0.15, protect_ratio=0.02, layers=[1, 2])``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal[PruningMethod.ODP] = PruningMethod.ODP  # the tag of a pruning config (suite recipes: "odp")
    mu: float | None = Field(None, ge=0.0)
    prune_rate: float | None = Field(None, ge=0.0, lt=1.0)
    quantile: float = Field(0.5, ge=0.0, le=1.0)
    layers: tuple[int, ...] | None = None
    protect_ratio: float = Field(0.02, ge=0.0, le=1.0)
    protect_scope: ProtectScope = ProtectScope.SEQUENCE
    attention_chunk: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _one_threshold(self) -> ODPConfig:
        if self.mu is not None and self.prune_rate is not None:
            raise ValueError("give either a fixed mu or a prune_rate, not both")
        return self


class ODPThresholds(BaseModel):
    """Fitted ODP: ``mu`` per decoder layer index, protection settings, and what was measured while fitting."""

    model_config = ConfigDict(extra="forbid")

    mu: dict[int, float]
    protect_ratio: float = Field(0.02, ge=0.0, le=1.0)
    protect_scope: ProtectScope = ProtectScope.SEQUENCE
    attention_chunk: int = Field(512, ge=1)
    calibration_pruned_fraction: dict[int, float] = Field(default_factory=dict)  # ratio rule alone, per layer
    calibration_tokens: int = 0


# -- the rule (pure) -------------------------------------------------------------------------------------------------
def weight_ratios(topk_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_e / w_top1`` for every slot (T, k) in float64, and the top-1 slot (T,) (slots are not sorted)."""
    w = topk_weight.double()
    top = w.argmax(dim=-1)  # (T,)
    w1 = w.gather(1, top[:, None]).clamp_min(torch.finfo(torch.float64).tiny)
    return w / w1, top


def ratio_keep(topk_weight: torch.Tensor, mu: float) -> torch.Tensor:
    """(T, k) bool keep-mask of the ratio rule: keep e iff ``w_e / w_top1 >= mu``; the top-1 is always kept."""
    ratio, top = weight_ratios(topk_weight)
    keep = ratio >= mu
    keep.scatter_(1, top[:, None], True)
    return keep


def decision_from_keep(routing: Routing, keep: torch.Tensor, layer: MoELayer) -> RoutingDecision | None:
    """The routing decision for ``keep`` (None when nothing is pruned: the model's routing, bit for bit)."""
    if bool(keep.all()):
        return None
    dec = RoutingDecision.keep_only(routing, keep, layer.spec)
    full = keep.all(dim=-1, keepdim=True)  # (T, 1) tokens with nothing pruned keep the model's exact weights
    weights = torch.where(full, routing.topk_weight, dec.weights)
    return RoutingDecision(keep=keep, weights=weights)


def non_top1_ratios(topk_weight: torch.Tensor) -> torch.Tensor:
    """(T * (k - 1),) the ratios of the selected non-top-1 pairs (ODP's calibration statistic)."""
    ratio, top = weight_ratios(topk_weight)
    mask = torch.ones_like(ratio, dtype=torch.bool).scatter_(1, top[:, None], False)
    return ratio[mask]


def threshold_from_ratios(ratios: torch.Tensor, *, top_k: int, quantile: float = 0.5,
                          prune_rate: float | None = None) -> float:
    """``mu`` from the non-top-1 ratio samples of one layer.

    With ``prune_rate`` (fraction of all top-k pairs to drop) the quantile is ``prune_rate * k / (k - 1)``; it must
    be at most 1 (a top-k router can lose at most k - 1 of k pairs per token).
    """
    if top_k < 2:
        raise ValueError("ODP needs top-k >= 2 (a top-1 router has nothing to prune)")
    if prune_rate is not None:
        quantile = prune_rate * top_k / (top_k - 1)
        if quantile > 1.0 + 1e-12:
            raise ValueError(f"prune_rate {prune_rate} impossible for top-{top_k}: at most {(top_k - 1) / top_k:.3f}")
        quantile = min(quantile, 1.0)
    if ratios.numel() == 0:
        raise ValueError("no ratio samples: the calibration data gave this layer no tokens")
    r = ratios.double().sort().values
    if quantile >= 1.0:
        return float(r[-1]) + 1e-6  # strictly above every ratio: drops all non-top-1 pairs seen
    if quantile <= 0.0:
        return 0.0
    # The smallest mu with P(ratio < mu) >= quantile on the samples: the n-th order statistic (n = ceil(q N)).
    n = max(1, min(r.numel(), int(torch.ceil(torch.tensor(quantile * r.numel())).item())))
    return float(r[n - 1]) + 1e-12


def thresholds_from_calibration_stats(stats: Any, *, quantile: float = 0.5, layers: Sequence[int] | None = None
                                      ) -> dict[int, float]:
    """``mu`` per layer read from the PMQ calibration statistics (``mcmoe_vl.calibration.stats``), if it stored the
    ratio quantiles (``odp_ratio``). Quantiles between stored ones are interpolated linearly."""
    out: dict[int, float] = {}
    for la in stats.layers:
        if layers is not None and la.index not in layers:
            continue
        rq = la.odp_ratio
        if rq is None:
            raise ValueError(f"calibration statistics of layer {la.index} have no ODP ratio quantiles")
        pts = sorted((float(k), v) for k, v in rq.quantiles.items())
        qs = [p for p, _ in pts]
        if not qs[0] - 1e-9 <= quantile <= qs[-1] + 1e-9:
            raise ValueError(f"quantile {quantile} outside the stored range {qs[0]}..{qs[-1]} (layer {la.index})")
        for (q0, v0), (q1, v1) in zip(pts, pts[1:], strict=False):
            if q0 - 1e-9 <= quantile <= q1 + 1e-9:
                t = 0.0 if q1 == q0 else (quantile - q0) / (q1 - q0)
                out[la.index] = v0 + t * (v1 - v0)
                break
        else:
            out[la.index] = pts[0][1]
    return out


# -- calibration -----------------------------------------------------------------------------------------------------
class RatioCollector:
    """Observer collecting the non-top-1 weight ratios of real (non-padding) tokens per MoE layer, for whole-model
    passes (:func:`run_batches`; :func:`fit_odp` reads the captured layers instead).

    Set :attr:`valid` to the batch's attention mask (B, S) before each forward (None: every token counts).
    """

    def __init__(self) -> None:
        self.valid: torch.Tensor | None = None
        self.ratios: dict[int, list[torch.Tensor]] = {}
        self.tokens: dict[int, int] = {}

    def __call__(self, ev: RoutingEvent) -> None:
        w = ev.routing.topk_weight
        if self.valid is not None:
            v = self.valid.reshape(-1).bool().to(w.device)
            if v.numel() != w.shape[0]:
                raise ValueError(f"attention mask has {v.numel()} positions but the MoE block saw {w.shape[0]} tokens")
            w = w[v]
        self.ratios.setdefault(ev.layer.index, []).append(non_top1_ratios(w).cpu())
        self.tokens[ev.layer.index] = self.tokens.get(ev.layer.index, 0) + w.shape[0]

    def samples(self, index: int) -> torch.Tensor:
        return torch.cat(self.ratios.get(index, [torch.zeros(0, dtype=torch.float64)]))


def check_interface_of(iface: ExpertInterface, model: nn.Module) -> None:
    """Refuse an expert interface built over another model than the one being fitted."""
    if not isinstance(iface, ExpertInterface):
        raise TypeError(f"iface must be the ExpertInterface over the model (ExpertInterface(model, adapter) or "
                        f"model_adapters.expert_interface(model)), got {type(iface).__name__}")
    if iface.model is not model:
        raise ValueError(f"the expert interface is over another model ({type(iface.model).__name__}) than the "
                         f"one given ({type(model).__name__})")


def select_layers(iface: ExpertInterface, layers: Sequence[int] | None) -> list[MoELayer]:
    """The MoE layers named by decoder index (all when None); unknown indices raise with the valid ones."""
    if layers is None:
        return list(iface.layers)
    valid = [la.index for la in iface.layers]
    bad = [i for i in layers if i not in valid]
    if bad:
        raise ValueError(f"decoder layers {bad} have no MoE block; MoE layers: {valid}")
    return [iface.layer(i) for i in layers]


def run_batches(model: nn.Module, batches: Iterable[Mapping[str, Any]], on_batch: Any = None) -> int:
    """Forward every batch (no grad); ``on_batch(batch)`` is called before each. Returns the number of batches."""
    n = 0
    with torch.no_grad():
        for batch in batches:
            batch = dict(batch)
            batch.setdefault("use_cache", False)
            if on_batch is not None:
                on_batch(batch)
            model(**batch)
            n += 1
    if n == 0:
        raise ValueError("no calibration batches were given")
    return n


def fit_odp(model: nn.Module, batches: Iterable[Mapping[str, Any]], config: ODPConfig | None = None, *,
            iface: ExpertInterface) -> ODPThresholds:
    """Fit ``mu`` per layer on calibration ``batches`` (dicts of model inputs; ``attention_mask`` marks padding).

    The unpruned model runs layer by layer over the batches (:mod:`mcmoe_vl.moe.layerwise`); each selected MoE
    layer's routing of the real tokens (:meth:`~mcmoe_vl.moe.layerwise.LayerStep.capture`) gives its ratios.
    ``iface``: the expert interface over ``model`` (installed for the pass, and uninstalled after it unless it was
    installed before).
    """
    config = config or ODPConfig()
    check_interface_of(iface, model)
    layers = select_layers(iface, config.layers)
    for la in layers:
        if la.top_k < 2:
            raise ValueError(f"{la.path}: top-{la.top_k} routing has nothing for ODP to prune")
    ratios: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    selected = {la.index for la in layers}
    was_installed = iface.installed
    iface.install()
    try:
        for step in iterate_layers(model, batches, adapter=iface.adapter, progress=False, stop=max(selected) + 1):
            if step.index in selected:
                cap = step.capture(iface)
                ratios[step.index] = torch.cat([non_top1_ratios(r.topk_weight).cpu() for r in cap.routing])
                tokens[step.index] = cap.num_tokens
    finally:
        if not was_installed:
            iface.uninstall()
    mu: dict[int, float] = {}
    pruned: dict[int, float] = {}
    for la in layers:
        r = ratios[la.index]
        if config.mu is not None:
            mu[la.index] = float(config.mu)
        else:
            mu[la.index] = threshold_from_ratios(r, top_k=la.top_k, quantile=config.quantile,
                                                 prune_rate=config.prune_rate)
        n_tok = tokens[la.index]
        pruned[la.index] = float((r < mu[la.index]).sum()) / max(1, n_tok * la.top_k)
        log.info("ODP layer %d: mu=%.4f, ratio rule prunes %.1f%% of top-%d pairs on %d calibration tokens",
                 la.index, mu[la.index], 100 * pruned[la.index], la.top_k, n_tok)
    return ODPThresholds(mu=mu, protect_ratio=config.protect_ratio, protect_scope=config.protect_scope,
                         attention_chunk=config.attention_chunk, calibration_pruned_fraction=pruned,
                         calibration_tokens=max(tokens.values(), default=0))


# -- the routing override --------------------------------------------------------------------------------------------
class RoutingRule:
    """Base of the pruning rules: a routing override installed on a set of MoE layers of an interface.

    Subclasses set ``iface`` and ``layers`` and implement ``__call__`` (the override); ``_install_extra`` /
    ``_remove_extra`` add and remove anything else the rule hooks into the model (ODP's attention capture).
    """

    iface: ExpertInterface
    layers: list[MoELayer]
    _installed: bool = False

    def install(self) -> RoutingRule:
        if self._installed:
            return self
        self.iface.install()
        for la in self.layers:
            if la.routing_override is not None:
                raise RuntimeError(f"{la.path} already has a routing override")
            la.routing_override = self
        self._install_extra()
        self._installed = True
        return self

    def remove(self) -> None:
        for la in self.layers:
            if la.routing_override is self:
                la.routing_override = None
        self._remove_extra()
        self._installed = False

    def _install_extra(self) -> None:
        pass

    def _remove_extra(self) -> None:
        pass

    def __enter__(self) -> RoutingRule:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class ODPRule(RoutingRule):
    """The ODP routing override on an :class:`ExpertInterface` (installed on the layers that have a ``mu``).

    Use as a context manager or call :meth:`install` / :meth:`remove`. With ``protect_ratio > 0`` it also installs
    an :class:`AttentionColumnCapture` on those layers' attention modules (only those). ``importance`` replaces
    Eq. 6 as the protection score (for ablations: e.g. random scores).
    """

    def __init__(self, iface: ExpertInterface, thresholds: ODPThresholds, *,
                 importance: Callable[[torch.Tensor, ColumnStats], torch.Tensor] = token_importance) -> None:
        self.iface = iface
        self.thresholds = thresholds
        self.importance = importance  # (B, S, H) MoE input, column stats -> (B, S) scores; Eq. 6 by default
        self.layers = select_layers(iface, sorted(thresholds.mu))
        self.capture: AttentionColumnCapture | None = None
        if thresholds.protect_ratio > 0:
            self.capture = AttentionColumnCapture.for_layers(self.layers, chunk_size=thresholds.attention_chunk)
        self.protected_tokens = 0  # diagnostics: tokens protected so far
        self._installed = False

    def __call__(self, layer: MoELayer, hidden: torch.Tensor, batch_shape: tuple[int, ...], routing: Routing
                 ) -> RoutingDecision | None:
        mu = self.thresholds.mu.get(layer.index)
        if mu is None:
            return None
        keep = ratio_keep(routing.topk_weight, mu)  # (T, k)
        if self.capture is not None:
            stats = self.capture.pop(layer.index)
            if stats is None:
                raise RuntimeError(f"{layer.path}: token protection needs the attention of decoder layer "
                                   f"{layer.index} to run before its MoE block (it did not)")
            if stats.prefill:
                if len(batch_shape) != 2 or tuple(batch_shape) != stats.shape:
                    raise RuntimeError(f"{layer.path}: MoE input batch shape {batch_shape} does not match the "
                                       f"attention's (B, S) = {stats.shape}")
                imp = self.importance(hidden.reshape(*batch_shape, -1), stats)  # (B, S)
                prot = protection_mask(imp, stats.valid, self.thresholds.protect_ratio,
                                       self.thresholds.protect_scope).reshape(-1)  # (T,)
                self.protected_tokens += int(prot.sum())
                keep = keep | prot[:, None]
        return decision_from_keep(routing, keep, layer)

    def _install_extra(self) -> None:
        if self.capture is not None:
            self.capture.install()

    def _remove_extra(self) -> None:
        if self.capture is not None:
            self.capture.remove()
