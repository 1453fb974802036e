"""The expert interface over any model the evaluation runs: original, or quantized by :mod:`mcmoe_vl.quant`.

The quantization engine replaces a fused experts module by a ``QuantExperts`` module (one packed expert module per
expert), which the adapters' fused storage does not describe. :func:`evaluation_interface` makes such a model look
like the original to the expert interface, so pruning rules and the activation meter work on it unchanged:

1. each ``QuantExperts`` is swapped for a stand-in that carries the original fused shapes as meta-device tensors
   (no memory; not parameters, so parameter counts and devices are unaffected),
2. the :class:`~mcmoe_vl.moe.ExpertInterface` is built and installed,
3. every expert is routed to its packed module with ``MoELayer.set_expert``,

and everything is put back on exit. A model without ``QuantExperts`` gets the plain interface.

::

    with evaluation_interface(model) as iface:
        rule = apply_pruning(iface, artifact)
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mcmoe_vl.moe import ExpertInterface


class _FusedShapes(nn.Module):
    """Meta-device ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) of a quantized experts module."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn: Callable[[torch.Tensor], torch.Tensor],
                 dtype: torch.dtype) -> None:
        super().__init__()
        # Plain attributes (not parameters or buffers): invisible to parameters(), state_dict() and .to().
        self.__dict__["gate_up_proj"] = torch.empty(num_experts, 2 * inter, hidden, device="meta", dtype=dtype)
        self.__dict__["down_proj"] = torch.empty(num_experts, hidden, inter, device="meta", dtype=dtype)
        self.act_fn = act_fn
        self.num_experts = num_experts

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("the stand-in of a quantized experts module is never run: the expert interface routes "
                           "every expert to its packed module")


def _down_shape(expert: nn.Module) -> tuple[int, int]:
    down = expert.down
    if isinstance(down, torch.Tensor):
        return tuple(down.shape)  # type: ignore[return-value]
    return down.out_features, down.in_features


def _quant_experts_class() -> type | None:
    try:
        from mcmoe_vl.quant.qlinear import QuantExperts
    except ImportError:
        return None
    return QuantExperts


@contextlib.contextmanager
def evaluation_interface(model: nn.Module) -> Iterator[ExpertInterface]:
    """An installed :class:`ExpertInterface` over ``model`` (see the module docstring); removed on exit."""
    from model_adapters import get_adapter

    qcls = _quant_experts_class()
    adapter = get_adapter(model)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if qcls is not None:
        for layer in adapter.decoder_layers(model):
            block = adapter.moe_block(layer)
            attr = getattr(adapter, "experts_attr", "experts")
            experts = getattr(block, attr, None) if block is not None else None
            if isinstance(experts, qcls):
                hidden, inter = _down_shape(experts.experts[0])
                dtype = next((b.dtype for b in experts.buffers() if b.is_floating_point()), torch.float32)
                setattr(block, attr, _FusedShapes(experts.num_experts, hidden, inter, experts.act_fn, dtype))
                swapped.append((block, attr, experts))
    try:
        iface = ExpertInterface(model)
        by_block = {id(b): q for b, _, q in swapped}
        with iface:
            for la in iface.layers:
                q = by_block.get(id(la.block))
                if q is not None:
                    for e in range(q.num_experts):
                        la.set_expert(e, q.experts[e])
            yield iface
    finally:
        for block, attr, experts in swapped:
            setattr(block, attr, experts)
