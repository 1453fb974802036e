"""Accounting of dynamic pruning: active experts per token, activated parameters per token, MoE-layer time.

:class:`ActivationMeter` is an observer on an :class:`~mcmoe_vl.moe.ExpertInterface`; it counts, per MoE layer,
the tokens and the (token, expert) pairs actually computed (the routing decision's keep-mask, which the interface
obeys: a pruned pair is never computed). Attach it to any run, pruned or not::

    with ExpertInterface(model, adapter) as iface, ActivationMeter(iface) as meter:
        meter.token_mask = batch["attention_mask"]     # optional: count real tokens only
        model(**batch)
    report = meter.report()                            # ActivationReport (JSON-serialisable)

Activated parameters per token (METHOD.md section 5) = the parameters every token uses (everything but the routed
experts: attention, norms, router, shared experts, embeddings and head) + for every MoE layer, the parameters of
one routed expert times the average number of experts a token activates there. Parameters are counted as weights
of the original model (gate + up + down of an expert), whatever their storage precision.

With ``time_layers=True`` the wall-clock time of each MoE block's forward is summed as well.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from mcmoe_vl.moe.interface import ExpertInterface, ObserverHandle
from mcmoe_vl.moe.routing import RoutingEvent


class LayerActivation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    top_k: int
    tokens: int
    active_pairs: int
    avg_active_experts: float  # per token
    reduction: float  # 1 - active / top_k
    expert_params: int  # one routed expert (gate + up + down)
    seconds: float | None = None  # summed MoE block time (time_layers)


class ActivationReport(BaseModel):
    """Per layer and overall activation accounting of one run."""

    model_config = ConfigDict(extra="forbid")

    layers: list[LayerActivation]
    avg_active_experts: float  # mean over MoE layers of the per-token average
    reduction: float  # fraction of top-k (token, expert) pairs not computed, over all layers
    always_active_params: int
    activated_params_per_token: float
    activated_params_per_token_unpruned: float
    activated_params_reduction: float
    moe_seconds: float | None = None


def routed_expert_params(iface: ExpertInterface) -> dict[int, int]:
    """Parameters of one routed expert per MoE layer (from the weight shapes)."""
    out = {}
    for la in iface.layers:
        w = la.expert_weights(0)
        out[la.index] = int(w.gate.numel() + w.up.numel() + w.down.numel())
    return out


def always_active_params(iface: ExpertInterface) -> int:
    """Every parameter of the model except the routed experts (counted once, shared tensors once)."""
    routed = {id(p) for la in iface.layers for p in la.storage.parameters()}
    seen: set[int] = set()
    total = 0
    for p in iface.model.parameters():
        if id(p) in routed or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


class ActivationMeter:
    """Counts computed (token, expert) pairs per MoE layer; see the module docstring.

    ``token_mask``: set to the batch's attention mask (B, S) before a forward to count real tokens only; it is
    ignored (all tokens counted) when its size does not match the block input, e.g. in cached decoding steps.
    """

    def __init__(self, iface: ExpertInterface, *, time_layers: bool = False,
                 expert_params: dict[int, int] | None = None) -> None:
        self.iface = iface
        self.time_layers = time_layers
        self.expert_params = expert_params or routed_expert_params(iface)
        self.always_active = always_active_params(iface)
        self.token_mask: torch.Tensor | None = None
        self.tokens: dict[int, int] = {la.index: 0 for la in iface.layers}
        self.pairs: dict[int, int] = {la.index: 0 for la in iface.layers}
        self.seconds: dict[int, float] = {la.index: 0.0 for la in iface.layers}
        self._handle: ObserverHandle | None = None
        self._hooks: list[Any] = []
        self._t0: dict[int, float] = {}

    def __call__(self, ev: RoutingEvent) -> None:
        T = ev.hidden.shape[0]
        keep = ev.keep
        mask = self.token_mask
        if mask is not None and mask.numel() == T:
            m = mask.reshape(-1).bool().to(ev.hidden.device)
            n_tok = int(m.sum())
            n_pairs = int(keep[m].sum()) if keep is not None else n_tok * ev.layer.top_k
        else:
            n_tok = T
            n_pairs = int(keep.sum()) if keep is not None else T * ev.layer.top_k
        self.tokens[ev.layer.index] += n_tok
        self.pairs[ev.layer.index] += n_pairs

    def attach(self) -> ActivationMeter:
        if self._handle is not None:
            return self
        self.iface.install()
        self._handle = self.iface.observe(self)
        if self.time_layers:
            for la in self.iface.layers:
                self._hooks.append(la.block.register_forward_pre_hook(self._start(la.index)))
                self._hooks.append(la.block.register_forward_hook(self._stop(la.index)))
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> ActivationMeter:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def reset(self) -> None:
        for d in (self.tokens, self.pairs):
            for k in d:
                d[k] = 0
        for k in self.seconds:
            self.seconds[k] = 0.0

    def _start(self, idx: int):
        def hook(module: Any, args: Any) -> None:
            self._t0[idx] = time.perf_counter()
        return hook

    def _stop(self, idx: int):
        def hook(module: Any, args: Any, out: Any) -> None:
            self.seconds[idx] += time.perf_counter() - self._t0.pop(idx, time.perf_counter())
        return hook

    def report(self) -> ActivationReport:
        layers = []
        act = 0.0
        full = 0.0
        total_pairs = total_full = 0
        for la in self.iface.layers:
            n, p, k = self.tokens[la.index], self.pairs[la.index], la.top_k
            avg = p / n if n else 0.0
            layers.append(LayerActivation(index=la.index, top_k=k, tokens=n, active_pairs=p, avg_active_experts=avg,
                                          reduction=1.0 - avg / k if n else 0.0,
                                          expert_params=self.expert_params[la.index],
                                          seconds=self.seconds[la.index] if self.time_layers else None))
            act += avg * self.expert_params[la.index]
            full += k * self.expert_params[la.index]
            total_pairs += p
            total_full += n * k
        measured = [x for x in layers if x.tokens]
        per_tok = self.always_active + act
        per_tok_full = self.always_active + full
        return ActivationReport(
            layers=layers,
            avg_active_experts=sum(x.avg_active_experts for x in measured) / len(measured) if measured else 0.0,
            reduction=1.0 - total_pairs / total_full if total_full else 0.0,
            always_active_params=self.always_active,
            activated_params_per_token=per_tok,
            activated_params_per_token_unpruned=per_tok_full,
            activated_params_reduction=1.0 - per_tok / per_tok_full,
            moe_seconds=sum(self.seconds.values()) if self.time_layers else None,
        )
