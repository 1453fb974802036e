"""The common expert interface: one view of every MoE layer, whatever the model family.

Every algorithm in the package (calibration statistics, the eps table, GPTQ, ODP, OTP) sees experts only through
:class:`MoELayer`. An adapter (``model_adapters``) builds the layers of a model; :class:`ExpertInterface` installs
them and removes them again::

    from model_adapters import get_adapter
    from mcmoe_vl.moe import ExpertInterface

    with ExpertInterface(model) as iface:          # routes through MoELayer.forward, outputs unchanged
        layer = iface.layers[0]
        w = layer.expert_weights(3)               # ExpertWeights(gate (I, H), up (I, H), down (H, I)) views
        handle = iface.observe(lambda ev: ...)    # per-token selections and weights, every forward
        iface.set_routing_override(my_rule)       # keep-mask over the top-k; pruned pairs are never computed
        layer.set_expert(3, my_quantized_expert)  # any nn.Module mapping (t, H) -> (t, H)
    # here the model is exactly as before

Installing replaces the MoE block's ``forward`` on the instance (the module tree and state dict are untouched);
the router module of the model is still called, so the model's own routing (and its output recorders such as
``output_router_logits``) stay in effect.

The dispatch in :meth:`MoELayer.forward` mirrors transformers 5's eager experts loop (experts in ascending order,
tokens of one expert ordered by top-k slot then token) so that, with nothing overridden, the outputs equal the
unmodified model's.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


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


@dataclass
class ExpertWeights:
    """One routed expert's weights as 2-D views: y = down(act(gate x) * up x)."""

    gate: torch.Tensor  # (I, H)
    up: torch.Tensor  # (I, H)
    down: torch.Tensor  # (H, I)


class ExpertStorage:
    """How a layer stores its routed experts. Subclasses give 2-D views and a dense expert module."""

    num_experts: int
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    def weights(self, i: int) -> ExpertWeights:
        raise NotImplementedError

    def dense_expert(self, i: int) -> nn.Module:
        """The unquantized expert i as a module mapping (t, H) -> (t, H), computing exactly like the model."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        """The parameters holding the routed experts (for freeing dense weights once replaced)."""
        raise NotImplementedError


class FusedExpertStorage(ExpertStorage):
    """transformers 5 layout: ``gate_up_proj`` (E, 2I, H) with the gate rows first, ``down_proj`` (E, H, I)."""

    def __init__(self, experts: nn.Module, act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        for name in ("gate_up_proj", "down_proj"):
            if not isinstance(getattr(experts, name, None), torch.Tensor):
                raise TypeError(f"{type(experts).__name__} has no 3-D {name!r}; not a fused experts module")
        self.module = experts
        self.num_experts = experts.gate_up_proj.shape[0]
        self.act_fn = act_fn or experts.act_fn

    @property
    def intermediate_size(self) -> int:
        return self.module.gate_up_proj.shape[1] // 2

    def weights(self, i: int) -> ExpertWeights:
        gu = self.module.gate_up_proj[i]  # (2I, H)
        n = self.intermediate_size
        return ExpertWeights(gate=gu[:n], up=gu[n:], down=self.module.down_proj[i])

    def dense_expert(self, i: int) -> nn.Module:
        return _FusedDenseExpert(self, i)

    def parameters(self) -> list[nn.Parameter]:
        return [self.module.gate_up_proj, self.module.down_proj]


class _FusedDenseExpert(nn.Module):
    # Not registered anywhere: reads the storage at call time, so in-place weight edits are seen.
    def __init__(self, storage: FusedExpertStorage, i: int) -> None:
        super().__init__()
        self._storage = [storage]  # list: keep the storage out of the module tree
        self.i = i

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (t, H) -> (t, H)
        st = self._storage[0]
        gate, up = F.linear(x, st.module.gate_up_proj[self.i]).chunk(2, dim=-1)  # (t, I) each
        return F.linear(st.act_fn(gate) * up, st.module.down_proj[self.i])


class ModuleListExpertStorage(ExpertStorage):
    """A list of expert modules, each with gate / up / down ``nn.Linear`` (attribute names configurable)."""

    def __init__(
        self,
        experts: nn.ModuleList,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        gate: str = "gate_proj",
        up: str = "up_proj",
        down: str = "down_proj",
    ) -> None:
        self.module = experts
        self.names = (gate, up, down)
        self.num_experts = len(experts)
        first = experts[0]
        for n in self.names:
            if not isinstance(getattr(first, n, None), nn.Linear):
                raise TypeError(f"expert module {type(first).__name__} has no nn.Linear {n!r}")
        self.act_fn = act_fn or first.act_fn

    def weights(self, i: int) -> ExpertWeights:
        e = self.module[i]
        g, u, d = (getattr(e, n).weight for n in self.names)
        return ExpertWeights(gate=g, up=u, down=d)

    def dense_expert(self, i: int) -> nn.Module:
        return self.module[i]

    def parameters(self) -> list[nn.Parameter]:
        return [p for e in self.module for p in e.parameters()]


RouterFn = Callable[[torch.Tensor], Routing]


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


@dataclass
class ObserverHandle:
    """Removes an observer from every layer it was added to."""

    _pairs: list[tuple[MoELayer, Callable[[RoutingEvent], None]]] = field(default_factory=list)

    def remove(self) -> None:
        for layer, fn in self._pairs:
            if fn in layer.observers:
                layer.observers.remove(fn)
        self._pairs.clear()

    def __enter__(self) -> ObserverHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class ExpertInterface:
    """Installs :class:`MoELayer` forwards on every MoE block of ``model``; removable, and removal is complete.

    ``adapter`` defaults to ``model_adapters.get_adapter(model)``.
    """

    def __init__(self, model: nn.Module, adapter: Any | None = None, *, install: bool = False) -> None:
        if adapter is None:
            from model_adapters import get_adapter

            adapter = get_adapter(model)
        self.model = model
        self.adapter = adapter
        self.layers: list[MoELayer] = list(adapter.moe_layers(model))
        if not self.layers:
            raise ValueError(f"{type(model).__name__}: the {adapter.name} adapter found no MoE layers")
        self.installed = False
        self._on_uninstall: list[Callable[[], None]] = []
        if install:
            self.install()

    def __iter__(self) -> Iterator[MoELayer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> MoELayer:
        """The MoE layer of decoder layer ``index``."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(f"decoder layer {index} has no MoE block; MoE layers: {[la.index for la in self.layers]}")

    def install(self) -> ExpertInterface:
        if self.installed:
            return self
        for layer in self.layers:
            if "forward" in vars(layer.block):
                raise RuntimeError(f"{layer.path} already has an instance forward: another interface is installed")
            layer.block.forward = layer.forward  # instance attribute shadows the class's forward
        self.installed = True
        return self

    def uninstall(self) -> None:
        """Remove everything installed: forwards, observers, overrides, replaced experts and whatever was
        registered with :meth:`on_uninstall` (e.g. an attention capture of a pruning rule)."""
        callbacks, self._on_uninstall = self._on_uninstall, []
        for fn in reversed(callbacks):
            fn()
        for layer in self.layers:
            vars(layer.block).pop("forward", None)
            layer.observers.clear()
            layer.routing_override = None
            layer.reset_expert()
        self.installed = False

    def __enter__(self) -> ExpertInterface:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def on_uninstall(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` when the interface is uninstalled (for hooks installed elsewhere on the model)."""
        self._on_uninstall.append(fn)

    # -- operations over all layers ----------------------------------------------------------------------------
    def observe(self, fn: Callable[[RoutingEvent], None], layers: list[int] | None = None) -> ObserverHandle:
        """Call ``fn(event)`` on every forward of the selected MoE layers (all by default)."""
        handle = ObserverHandle()
        for layer in self._select(layers):
            layer.observers.append(fn)
            handle._pairs.append((layer, fn))
        return handle

    def set_routing_override(self, fn: RoutingOverride | None, layers: list[int] | None = None) -> None:
        """Install ``fn`` as the routing override of the selected layers (None removes it)."""
        for layer in self._select(layers):
            layer.routing_override = fn

    def _select(self, layers: list[int] | None) -> list[MoELayer]:
        if layers is None:
            return self.layers
        return [self.layer(i) for i in layers]


def scores_from_logits(logits: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """Routing probabilities from router logits, in float32 like the models compute them."""
    if scoring is Scoring.SOFTMAX:
        return torch.softmax(logits.float(), dim=-1)
    return torch.sigmoid(logits.float())
