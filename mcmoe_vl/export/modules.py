"""A compressed model as named linears: integer codes with their group scales and zeros, or dense weights.

Every quantized width maps onto asymmetric integer codes: ``w = scale * (code - zero)`` per (row, group of
``group_size`` columns). A 1-bit expert (binarisation, ``w = s * B``, B = +-1) becomes 2-bit codes {0, 2} with
zero 1, which gives exactly ``s * (2b - 1)``: the same float32 values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.qlinear import DenseExpert, QuantExpert, QuantExperts, QuantLinear
from model_adapters.base import MoEAdapter


class ExportError(ValueError):
    """A checkpoint that cannot be written in the requested format; the message says why and what would work."""


@dataclass
class IntLinear:
    """One quantized linear as integer codes: ``w = scale * (codes - zero)`` per (row, group)."""

    name: str  # module name in the exported checkpoint
    bits: int  # width of the codes (1-bit experts are exported as 2-bit codes)
    source_bits: int  # width in the compressed checkpoint
    codes: torch.Tensor  # (R, C) int, natural column order
    scale: torch.Tensor  # (R, G) float32
    zero: torch.Tensor  # (R, G) float32, integer-valued
    group_size: int
    bias: torch.Tensor | None = None


def int_linear(name: str, p: PackedTensor, bias: torch.Tensor | None = None, rows: slice = slice(None)) -> IntLinear:
    """Rows ``rows`` of packed tensor ``p`` as codes, scale and zero (1 bit becomes 2-bit codes {0, 2}, zero 1)."""
    if p.perm is not None:
        raise ExportError(f"{name}: quantized with act-order (a column permutation), which this export cannot "
                          "carry; quantize without --act-order to export")
    codes, scale = p.codes()[rows].to(torch.int16), p.scale[rows].float()
    if p.meta.bits == 1:
        return IntLinear(name, 2, 1, codes * 2, scale, torch.ones_like(scale), p.meta.group_size, bias)
    return IntLinear(name, p.meta.bits, p.meta.bits, codes, scale, p.zero[rows].float(), p.meta.group_size, bias)


def model_linears(model: nn.Module, adapter: MoEAdapter) -> Iterator[IntLinear | tuple[str, torch.Tensor]]:
    """Every quantized linear of ``model`` as :class:`IntLinear`, and every 16-bit expert weight as
    ``(name.weight, tensor)``, named as the family's hub checkpoints name them (:meth:`MoEAdapter.hub_name`,
    ``MoEAdapter.hub_expert_names``); other tensors are not included (see :func:`dense_tensors`)."""
    owned = {id(m) for _, mod in model.named_modules() if isinstance(mod, QuantExperts) for m in mod.modules()}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and id(mod) not in owned:
            yield int_linear(adapter.hub_name(name), mod.packed, None if mod.bias is None else mod.bias.detach())
        elif isinstance(mod, QuantExperts):
            gate, up, down = adapter.hub_expert_names
            for e, ex in enumerate(mod.experts):
                yield from _expert(adapter.hub_name(f"{name}.{e}"), ex, gate, up, down)


def _expert(prefix: str, ex: nn.Module, gate: str, up: str,
            down: str) -> Iterator[IntLinear | tuple[str, torch.Tensor]]:
    if isinstance(ex, QuantExpert):
        if ex.gate_up is not None:
            rows = ex.gate_up.out_features // 2  # [gate; up] stacked by rows
            yield int_linear(f"{prefix}.{gate}", ex.gate_up.packed, rows=slice(0, rows))
            yield int_linear(f"{prefix}.{up}", ex.gate_up.packed, rows=slice(rows, None))
        else:
            yield int_linear(f"{prefix}.{gate}", ex.gate.packed)
            yield int_linear(f"{prefix}.{up}", ex.up.packed)
        yield int_linear(f"{prefix}.{down}", ex.down.packed)
    elif isinstance(ex, DenseExpert):
        g, u = ex.gate_up.detach().chunk(2, dim=0)
        yield from ((f"{prefix}.{gate}.weight", g), (f"{prefix}.{up}.weight", u),
                    (f"{prefix}.{down}.weight", ex.down.detach()))
    else:
        raise ExportError(f"{prefix}: expert of type {type(ex).__name__} cannot be exported")


def dense_tensors(model: nn.Module, adapter: MoEAdapter) -> dict[str, torch.Tensor]:
    """The model's tensors that are not part of a quantized linear or an expert module (embeddings, norms, ...),
    under their hub names and shapes (:meth:`MoEAdapter.hub_tensors`)."""
    skip = {name + "." for name, mod in model.named_modules() if isinstance(mod, (QuantLinear, QuantExperts))}
    rest = {k: v.detach() for k, v in model.state_dict().items() if not any(k.startswith(p) for p in skip)}
    return {k: v.contiguous() for k, v in adapter.hub_tensors(rest).items()}


def load_for_export(ckpt_dir: str | os.PathLike[str]) -> tuple[nn.Module, MoEAdapter]:
    """The compressed model of ``ckpt_dir`` (packed runtime, without its pruning settings) and its family's
    adapter, which loads it (:meth:`MoEAdapter.load_compressed`) and names its tensors."""
    from model_adapters import adapter_of_directory

    adapter = adapter_of_directory(ckpt_dir)
    return adapter.load_compressed(ckpt_dir, runtime="packed", apply_pruning=False), adapter
