"""A compressed model as named linears: integer codes with their group scales and zeros, or dense weights.

Every quantized width maps onto asymmetric integer codes: ``w = scale * (code - zero)`` per (row, group of
``group_size`` columns). A 1-bit expert (binarisation, ``w = s * B``, B = +-1) becomes 2-bit codes {0, 2} with
zero 1, which gives exactly ``s * (2b - 1)``: the same float32 values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.qlinear import DenseExpert, QuantExpert, QuantExperts, QuantLinear

# Names as the model family's hub checkpoints (and the serving engines' loaders) spell them: renames applied to
# every tensor name, and the routed experts' (gate, up, down) projection names.
HUB_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".mlp.", ".block_sparse_moe."),)}
EXPERT_NAMES: dict[str, tuple[str, str, str]] = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


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


def hub_name(model_type: str | None, name: str) -> str:
    for a, b in HUB_RENAMES.get(model_type or "", ()):
        name = name.replace(a, b)
    return name


def model_linears(model: nn.Module) -> Iterator[IntLinear | tuple[str, torch.Tensor]]:
    """Every quantized linear of ``model`` as :class:`IntLinear`, and every 16-bit expert weight as
    ``(name.weight, tensor)``; other tensors are not included (see :func:`dense_tensors`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    owned = {id(m) for _, mod in model.named_modules() if isinstance(mod, QuantExperts) for m in mod.modules()}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and id(mod) not in owned:
            yield int_linear(hub_name(model_type, name), mod.packed, None if mod.bias is None else mod.bias.detach())
        elif isinstance(mod, QuantExperts):
            gate, up, down = EXPERT_NAMES.get(model_type or "", DEFAULT_EXPERT_NAMES)
            for e, ex in enumerate(mod.experts):
                yield from _expert(hub_name(model_type, f"{name}.{e}"), ex, gate, up, down)


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


def dense_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors that are not part of a quantized linear or an expert module (embeddings, norms, ...)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    skip = {name + "." for name, mod in model.named_modules() if isinstance(mod, (QuantLinear, QuantExperts))}
    return {hub_name(model_type, k): v.detach().contiguous() for k, v in model.state_dict().items()
            if not any(k.startswith(p) for p in skip)}


def load_for_export(ckpt_dir: str | os.PathLike[str]) -> nn.Module:
    """The compressed model of ``ckpt_dir`` (packed runtime), through the model family's own loader."""
    from mcmoe_vl.quant.checkpoint import load_quantized, read_manifest

    man = read_manifest(ckpt_dir)
    if man.model_type == "deepseek_vl_v2":
        from model_adapters.deepseek_vl2.loading import from_pretrained

        return from_pretrained(Path(ckpt_dir), apply_pruning=False)
    return load_quantized(ckpt_dir)
