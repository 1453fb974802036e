"""Bit accounting of a quantized model (METHOD.md section 5). Three figures, each named:

- **nominal bits** (the paper's): ``sum(bits * params) / sum(params)`` over routed-expert and attention linear
  weights only, without scale / zero overhead. For Mixtral-8x7B at expert averages 1.5 / 2.0 / 2.5 with 4-bit
  attention this is 1.572 / 2.058 / 2.543, which the paper prints truncated as 1.57 / 2.05 / 2.54.
- **effective bits**: every stored byte (codes, scales, zeros, permutations, 16-bit tensors) x 8 / the number of
  parameters they represent; per category (experts, attention, other, total). At group 128 a 2-bit expert weight
  costs 2 + 2 * 16 / 128 = 2.25 bits.
- **bytes on disk** (``os.stat`` of the checkpoint files) and **resident bytes** (the storage actually held by a
  loaded model's parameters and buffers, each storage counted once), measured, not computed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

CATEGORIES = ("experts", "attention", "other")


class CategoryBits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: int = 0  # logical parameters represented
    stored_bytes: int = 0  # bytes of every tensor storing them
    nominal_bit_params: int = 0  # sum of width x params (16 for unquantized tensors)

    @property
    def effective_bits(self) -> float:
        return self.stored_bytes * 8 / self.params if self.params else 0.0

    @property
    def nominal_bits(self) -> float:
        return self.nominal_bit_params / self.params if self.params else 0.0


class Accounting(BaseModel):
    """All accounting figures of one compressed model (stored in the checkpoint manifest)."""

    model_config = ConfigDict(extra="forbid")

    categories: dict[str, CategoryBits] = Field(default_factory=dict)
    nominal_bits: float = 0.0  # experts + attention linears, codes only (paper style)
    effective_bits: float = 0.0  # all stored bytes x 8 / all parameters
    effective_bits_experts: float = 0.0
    bytes_on_disk: int | None = None
    resident_bytes: int | None = None
    params: int = 0

    def summary(self) -> dict[str, float | int | None]:
        return {"nominal_bits": self.nominal_bits, "effective_bits": self.effective_bits,
                "effective_bits_experts": self.effective_bits_experts, "bytes_on_disk": self.bytes_on_disk,
                "resident_bytes": self.resident_bytes, "params": self.params}


def nominal_bits(parts: Iterable[tuple[int, float]]) -> float:
    """Paper-style average width of ``(params, bits)`` parts: ``sum(bits * params) / sum(params)``."""
    parts = list(parts)
    total = sum(n for n, _ in parts)
    if total == 0:
        raise ValueError("no parameters to average over")
    return sum(n * b for n, b in parts) / total


def build_accounting(categories: dict[str, CategoryBits], *, bytes_on_disk: int | None = None,
                     resident_bytes: int | None = None) -> Accounting:
    nom = [categories[c] for c in ("experts", "attention") if c in categories]
    nparams = sum(c.params for c in categories.values())
    return Accounting(
        categories=categories,
        nominal_bits=(sum(c.nominal_bit_params for c in nom) / sum(c.params for c in nom))
        if sum(c.params for c in nom) else 0.0,
        effective_bits=sum(c.stored_bytes for c in categories.values()) * 8 / nparams if nparams else 0.0,
        effective_bits_experts=categories["experts"].effective_bits if "experts" in categories else 0.0,
        bytes_on_disk=bytes_on_disk,
        resident_bytes=resident_bytes,
        params=nparams,
    )


def bytes_on_disk(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Measured size of files (``os.stat``)."""
    return sum(os.stat(Path(p)).st_size for p in paths)


def resident_bytes(model: nn.Module, *, include_caches: bool = False) -> int:
    """Bytes of the storages held by ``model``'s parameters and buffers, each storage counted once.

    Non-persistent buffers (e.g. fake-quant weight caches, rotary tables) are included only with
    ``include_caches``; rotary tables are tiny, and fake-quant caches are what that runtime costs.
    """
    seen: set[int] = set()
    total = 0
    persistent: set[int] = set()
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                persistent.add(id(buf))
    tensors: list[torch.Tensor] = list(model.parameters())
    tensors += [b for b in model.buffers() if include_caches or id(b) in persistent]
    for t in tensors:
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total
