"""The common expert interface: one view of every MoE layer, whatever the model family.

Every algorithm in the package (calibration statistics, the eps table, GPTQ, ODP, OTP) sees experts only through
:class:`~mcmoe_vl.moe.layer.MoELayer`. An adapter (``model_adapters``) builds the layers of a model;
:class:`ExpertInterface` installs them and removes them again. The adapter is resolved once, by the caller (the
workflow, or ``model_adapters.expert_interface(model)``), and passed in: this package never looks a family up::

    from model_adapters import get_adapter
    from mcmoe_vl.moe import ExpertInterface

    with ExpertInterface(model, get_adapter(model)) as iface:  # routes through MoELayer.forward, outputs unchanged
        layer = iface.layers[0]
        w = layer.expert_weights(3)               # ExpertWeights(gate (I, H), up (I, H), down (H, I)) views
        handle = iface.observe(lambda ev: ...)    # per-token selections and weights, every forward
        iface.set_routing_override(my_rule)       # keep-mask over the top-k; pruned pairs are never computed
        layer.set_expert(3, my_quantized_expert)  # any nn.Module mapping (t, H) -> (t, H)
    # here the model is exactly as before

Installing replaces the MoE block's ``forward`` on the instance (the module tree and state dict are untouched);
the router module of the model is still called, so the model's own routing (and its output recorders such as
``output_router_logits``) stay in effect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from .layer import MoELayer
from .routing import RoutingEvent, RoutingOverride


class LayerSource(Protocol):
    """What :class:`ExpertInterface` needs of an adapter (``model_adapters.base.MoEAdapter`` is one)."""

    name: str

    def moe_layers(self, model: nn.Module) -> Iterable[MoELayer]: ...


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

    ``adapter`` builds the layers (``adapter.moe_layers(model)``): the model family's adapter, resolved by the
    caller (``model_adapters.get_adapter(model)``).
    """

    def __init__(self, model: nn.Module, adapter: LayerSource, *, install: bool = False) -> None:
        if adapter is None or not callable(getattr(adapter, "moe_layers", None)):
            raise TypeError(f"ExpertInterface needs the model's adapter (an object with moe_layers(model), e.g. "
                            f"model_adapters.get_adapter(model)), got {adapter!r}")
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
