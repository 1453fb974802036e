"""The packed weight type: codes at their true width plus 16-bit parameters per (row, group).

A :class:`PackedTensor` holds a quantized weight of logical shape ``(..., R, C)`` (one matrix, or a stack of
experts) as

- ``qdata`` (..., R, row_bytes) uint8: each row's codes packed by :mod:`mcmoe_vl.quant.packing`,
- ``scale`` (..., R, G) and ``zero`` (..., R, G) 16-bit (``zero`` is None at 1 bit), ``G = ceil(C / group_size)``,
- ``perm`` (..., C) int32 or None: with act-order, stored column k is column ``perm[k]`` of the weight and groups
  are consecutive *stored* columns,

apart from its metadata (:class:`PackedMeta`: bits, shape, group size). :meth:`PackedTensor.dequantize` is the one
dequantisation used by both runtimes (``scale * (q - zero)``, or ``s * (2q - 1)`` at 1 bit, computed in float32 and
rounded once to the requested dtype), which is why packed and fake-quant outputs are bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import packing
from .gptq import QuantResult
from .quantizer import dequantize_binary, dequantize_minmax

PARAM_DTYPE = torch.float16


@dataclass(frozen=True)
class PackedMeta:
    bits: int
    shape: tuple[int, ...]  # logical (..., R, C)
    group_size: int

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def groups(self) -> int:
        return math.ceil(self.cols / self.group_size)

    def to_json(self) -> dict:
        return {"bits": self.bits, "shape": list(self.shape), "group_size": self.group_size}


@dataclass
class PackedTensor:
    qdata: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    perm: torch.Tensor | None
    meta: PackedMeta

    def __post_init__(self) -> None:
        self.validate()

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_result(cls, res: QuantResult, *, param_dtype: torch.dtype = PARAM_DTYPE) -> PackedTensor:
        """Pack a :class:`~mcmoe_vl.quant.gptq.QuantResult` (codes in storage order)."""
        r, c = res.codes.shape
        return cls(
            qdata=packing.pack(res.codes, res.bits),
            scale=res.scale.to(param_dtype).contiguous(),
            zero=None if res.zero is None else res.zero.to(param_dtype).contiguous(),
            perm=None if res.perm is None else res.perm.to(torch.int32),
            meta=PackedMeta(res.bits, (r, c), res.group_size),
        )

    @classmethod
    def stack(cls, items: list[PackedTensor]) -> PackedTensor:
        """Stack equally shaped packed matrices of one width into (E, R, C) (e.g. experts of one layer)."""
        m = items[0].meta
        if any(t.meta != m for t in items):
            raise ValueError("can only stack packed tensors with the same bits, shape and group size")
        if any((t.perm is None) != (items[0].perm is None) or (t.zero is None) != (items[0].zero is None)
               for t in items):
            raise ValueError("can only stack packed tensors that all have (or all lack) perm and zero")
        st = lambda xs: None if xs[0] is None else torch.stack(xs)  # noqa: E731
        return cls(torch.stack([t.qdata for t in items]), torch.stack([t.scale for t in items]),
                   st([t.zero for t in items]), st([t.perm for t in items]),
                   PackedMeta(m.bits, (len(items), *m.shape), m.group_size))

    # -- checks ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field whose shape or dtype does not match the metadata."""
        m = self.meta
        lead, (r, c) = tuple(m.shape[:-2]), m.shape[-2:]
        want = {
            "qdata": ((*lead, r, packing.packed_row_bytes(c, m.bits)), torch.uint8),
            "scale": ((*lead, r, m.groups), None),
        }
        if m.bits >= 2:
            want["zero"] = ((*lead, r, m.groups), None)
        elif self.zero is not None:
            raise ValueError("a 1-bit packed tensor has no zero")
        if self.perm is not None:
            want["perm"] = ((*lead, c), None)
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"packed {m.bits}-bit tensor {m.shape}: {name} is missing")
            if tuple(t.shape) != shape:
                raise ValueError(f"packed {m.bits}-bit tensor {m.shape}: {name} has shape {tuple(t.shape)}, "
                                 f"expected {shape}")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"packed tensor {name} must be {dtype}, got {t.dtype}")

    # -- use ---------------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.meta.bits

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    def codes(self) -> torch.Tensor:
        """(..., R, C) uint8 codes in storage order."""
        return packing.unpack(self.qdata, self.meta.bits, self.meta.cols)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight (..., R, C) in natural column order, as ``dtype``."""
        m = self.meta
        c, g, G = m.cols, m.group_size, m.groups
        q = self.codes()  # (..., R, C)
        pad = G * g - c
        if pad:
            q = torch.nn.functional.pad(q, (0, pad))
        q = q.reshape(*q.shape[:-1], G, g)  # (..., R, G, g)
        s = self.scale.unsqueeze(-1)  # (..., R, G, 1)
        if m.bits == 1:
            w = dequantize_binary(q, s)
        else:
            w = dequantize_minmax(q, s, self.zero.unsqueeze(-1))
        w = w.reshape(*w.shape[:-2], G * g)[..., :c].to(dtype)  # (..., R, C)
        if self.perm is not None:
            inv = torch.argsort(self.perm.long(), dim=-1)  # natural column j is stored column inv[j]
            w = torch.gather(w, -1, inv.unsqueeze(-2).expand_as(w))
        return w

    def __getitem__(self, i: int) -> PackedTensor:
        """Expert ``i`` of a stacked (E, R, C) packed tensor."""
        if len(self.meta.shape) < 3:
            raise IndexError("only stacked packed tensors can be indexed")
        return PackedTensor(self.qdata[i], self.scale[i], None if self.zero is None else self.zero[i],
                            None if self.perm is None else self.perm[i],
                            PackedMeta(self.meta.bits, self.meta.shape[1:], self.meta.group_size))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (what a checkpoint saves)."""
        out = {"qdata": self.qdata, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: PackedMeta) -> PackedTensor:
        unknown = set(tensors) - {"qdata", "scale", "zero", "perm"}
        if unknown:
            raise ValueError(f"unexpected packed fields {sorted(unknown)}")
        if "qdata" not in tensors or "scale" not in tensors:
            raise ValueError(f"packed tensor is missing {sorted({'qdata', 'scale'} - set(tensors))}")
        return cls(tensors["qdata"], tensors["scale"], tensors.get("zero"), tensors.get("perm"), meta)

    @property
    def nbytes(self) -> int:
        """Bytes of storage actually held (codes + parameters + permutation)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors().values())

    @property
    def numel(self) -> int:
        return math.prod(self.meta.shape)
