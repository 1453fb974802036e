"""Hessians of one decoder layer's calibration tokens for GPTQ (:func:`mcmoe_vl.quant.model.quantize_model`).

Only the batch's real tokens count (:attr:`mcmoe_vl.moe.layerwise.LayerInput.valid`): left-padded VLM batches must
not put padding into any Hessian. Per routed expert, the Hessian of the tokens routed to it (gate and up share it)
and that of the down projection's input ``act(gate x) * up x``.
"""

from __future__ import annotations

import torch
from torch import nn

from mcmoe_vl.moe.layer import MoELayer
from mcmoe_vl.moe.layerwise import LayerInput, LayerStep, run_layer

from .gptq import HessianAccumulator


class ValidTokens:
    """The valid-token mask of the cached batch the layer is running on now (set by :func:`collect_layer` from
    :attr:`~mcmoe_vl.moe.layerwise.LayerInput.valid`), applied to inputs."""

    def __init__(self) -> None:
        self.current: LayerInput | None = None  # the cached batch running now (None: every token is real)
        self.rerouting = False  # the expert collector is calling the router itself: not a forward of the layer

    def rows(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """``x`` (..., C) flattened to (T, C), padding rows removed."""
        if self.current is None:
            return x.reshape(-1, x.shape[-1])
        return self.current.valid_rows(x, where)


def collect_layer(step: LayerStep, valid: ValidTokens) -> None:
    """One forward of the layer per cached batch, with ``valid`` set to that batch's padding mask."""
    try:
        with torch.no_grad():
            for inp in step.inputs:
                valid.current = inp
                run_layer(step.layer, inp)
    finally:
        valid.current = None


class ExpertCollector:
    """Hessians of the (real) tokens routed to each expert of one MoE layer (computed with the dense weights)."""

    def __init__(self, layer: MoELayer, dtype: torch.dtype, valid: ValidTokens) -> None:
        self.layer = layer
        self.dtype = dtype
        self.valid = valid
        self.h_in: dict[int, HessianAccumulator] = {}
        self.h_down: dict[int, HessianAccumulator] = {}
        self.tokens = [0] * layer.num_experts

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        x = self.valid.rows(hidden, self.layer.path)  # (T, H), padding removed
        self.valid.rerouting = True
        try:
            routing = self.layer.route(x)
        finally:
            self.valid.rerouting = False
        st = self.layer.storage
        for e in range(self.layer.num_experts):
            tok = (routing.topk_idx == e).any(dim=-1).nonzero().squeeze(-1)
            if tok.numel() == 0:
                continue
            xe = x[tok]  # (n, H)
            w = st.weights(e)
            h = (st.act_fn(xe @ w.gate.t().to(xe.dtype)) * (xe @ w.up.t().to(xe.dtype)))  # (n, I)
            if e not in self.h_in:
                self.h_in[e] = HessianAccumulator(x.shape[1], dtype=self.dtype)
                self.h_down[e] = HessianAccumulator(h.shape[1], dtype=self.dtype)
            self.h_in[e].add(xe)
            self.h_down[e].add(h)
            self.tokens[e] += int(tok.numel())
