"""One MoE layer seen through the common expert interface (:class:`MoELayer`).

The dispatch in :meth:`MoELayer.forward` mirrors transformers 5's eager experts loop (experts in ascending order,
tokens of one expert ordered by top-k slot then token) so that, with nothing overridden, the outputs equal the
unmodified model's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .routing import RouterFn, Routing, RoutingEvent, RoutingOverride, RoutingSpec
from .storage import ExpertStorage, ExpertWeights


class MoELayer:
    """One MoE layer of a model seen through the common interface.

    Built by an adapter. ``route`` computes the routing exactly as the model does; ``forward`` is what the block
    runs while the interface is installed: routing, optional override (keep-mask), observers, dispatch to the
    current expert implementations (dense by default, or whatever :meth:`set_expert` installed), shared experts.
    """

    def __init__(
        self,
        *,
        index: int,
        path: str,
        block: nn.Module,
        spec: RoutingSpec,
        router: RouterFn,
        storage: ExpertStorage,
        shared_experts: nn.Module | None = None,
        attention: nn.Module | None = None,
    ) -> None:
        if storage.num_experts != spec.num_experts:
            raise ValueError(f"{path}: storage has {storage.num_experts} experts but the router {spec.num_experts}")
        self.index = index
        self.path = path
        self.block = block
        self.spec = spec
        self._router = router
        self.storage = storage
        self.shared_experts = shared_experts
        self.attention = attention  # the self-attention of the same decoder layer (for token importance)
        self._experts: dict[int, nn.Module] = {}
        self._dense: dict[int, nn.Module] = {}  # dense expert modules, built once on first use
        self.observers: list[Callable[[RoutingEvent], None]] = []
        self.routing_override: RoutingOverride | None = None
        # routed + shared experts in one call (mcmoe_vl.moe.fused); returns None to decline (e.g. many tokens)
        self.fused: Callable[..., torch.Tensor | None] | None = None

    # -- description -------------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def top_k(self) -> int:
        return self.spec.top_k

    def __repr__(self) -> str:
        return f"MoELayer({self.index}, {self.path!r}, {self.spec.num_experts} experts, top-{self.spec.top_k})"

    # -- routing -----------------------------------------------------------------------------------------------
    def route(self, hidden: torch.Tensor) -> Routing:
        """Routing for ``hidden`` (T, H), exactly as the model computes it."""
        return self._router(hidden.reshape(-1, hidden.shape[-1]))

    # -- experts -----------------------------------------------------------------------------------------------
    def expert_weights(self, i: int) -> ExpertWeights:
        self._check_expert(i)
        return self.storage.weights(i)

    def expert(self, i: int) -> nn.Module:
        """The implementation expert i currently runs with (a replacement, or the dense original)."""
        self._check_expert(i)
        replaced = self._experts.get(i)
        if replaced is not None:
            return replaced
        dense = self._dense.get(i)
        if dense is None:
            dense = self._dense[i] = self.storage.dense_expert(i)
        return dense

    def set_expert(self, i: int, module: nn.Module) -> None:
        """Run expert i with ``module`` ((t, H) -> (t, H), unweighted) from now on."""
        self._check_expert(i)
        self._experts[i] = module
        self.fused = None  # built from the previous experts

    def reset_expert(self, i: int | None = None) -> None:
        """Back to the dense original for expert i (all experts when None)."""
        if i is None:
            self._experts.clear()
        else:
            self._experts.pop(i, None)
        self.fused = None

    @property
    def replaced_experts(self) -> dict[int, nn.Module]:
        return dict(self._experts)

    def _check_expert(self, i: int) -> None:
        if not 0 <= i < self.spec.num_experts:
            raise IndexError(f"{self.path}: expert {i} out of range 0..{self.spec.num_experts - 1}")

    # -- running -----------------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MoE block's computation through the interface. ``hidden`` (..., H) -> (..., H)."""
        batch_shape = tuple(hidden.shape[:-1])
        x = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
        routing = self.route(x)
        keep: torch.Tensor | None = None
        weights = routing.topk_weight
        if self.routing_override is not None:
            decision = self.routing_override(self, x, batch_shape, routing)
            if decision is not None:
                keep = decision.keep
                if decision.weights is not None:
                    weights = decision.weights
        if self.observers:
            event = RoutingEvent(self, x, batch_shape, routing, keep, weights)
            for fn in list(self.observers):
                fn(event)
        fused = None if self.fused is None else self.fused(x, routing.topk_idx, weights, keep)
        if fused is not None:
            return fused.reshape(hidden.shape)
        out = self.dispatch(x, routing.topk_idx, weights, keep).reshape(hidden.shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)  # on the unflattened input, as the models call it
        return out

    __call__ = forward

    def forward_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the MoE block alone on a cached input (``hidden`` as the block receives it)."""
        return self.forward(hidden)

    def dispatch(
        self,
        x: torch.Tensor,  # (T, H)
        topk_idx: torch.Tensor,  # (T, k)
        weights: torch.Tensor,  # (T, k)
        keep: torch.Tensor | None = None,  # (T, k) bool
    ) -> torch.Tensor:
        """Weighted sum of the selected experts' outputs; pairs with ``keep == False`` are never computed."""
        T, k = topk_idx.shape
        E = self.spec.num_experts
        out = torch.zeros_like(x)
        if T == 0:
            return out
        # Slot-major order (slot, token) like transformers' eager loop; pruned pairs go to a sentinel expert E.
        idx = topk_idx if keep is None else topk_idx.masked_fill(~keep, E)
        flat = idx.t().reshape(-1)  # (k*T,)
        order = torch.argsort(flat, stable=True)  # grouped by expert, then slot, then token
        counts = torch.bincount(flat, minlength=E + 1).tolist()
        n_kept = len(flat) - counts[E]
        sel = order[:n_kept]  # the kept pairs, expert-major; the sentinel's pairs sort last
        pos, tok = sel // T, sel % T
        xs = x[tok]  # (n_kept, H) gathered once
        ys = torch.empty_like(xs)
        start = 0
        for e in range(E):
            n = counts[e]
            if n:
                ys[start : start + n] = self.expert(e)(xs[start : start + n])
                start += n
        ys = ys * weights[tok, pos, None]
        # One scatter; rows are in expert order, so each token still accumulates its experts in ascending order.
        out.index_add_(0, tok, ys.to(out.dtype))
        return out
