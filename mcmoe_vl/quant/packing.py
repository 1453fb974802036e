"""Bit-packing primitives: integer codes of 1, 2, 3 or 4 bits into uint8 containers, along the last dimension.

Every function packs each row (the last dimension) independently, so a row of a weight matrix starts on a byte
boundary and any leading shape (one matrix, or a stack of experts) is kept. Rows whose length is not a multiple of
the codes per container are zero-padded; ``unpack_*`` takes the original length ``n`` and drops the padding.

=======  ===========================  =====================================================
width    container                     layout
=======  ===========================  =====================================================
1 bit    8 codes per byte             code j of a byte at bit j (LSB first)
2 bits   4 codes per byte             code j at bits 2j..2j+1
3 bits   8 codes in 3 bytes (24 bits) code j at bits 3j..3j+2 of the little-endian 24-bit word
4 bits   2 codes per byte             code 0 in the low nibble, code 1 in the high nibble
=======  ===========================  =====================================================

All work is vectorised over elements; the only Python loops run over the (at most 8) positions inside a container.
"""

from __future__ import annotations

import math

import torch

from .widths import QUANT_WIDTHS as SUPPORTED_BITS  # the engine's widths, defined once

# width -> (codes per container, bytes per container)
_LAYOUT = {1: (8, 1), 2: (4, 1), 3: (8, 3), 4: (2, 1)}


def _layout(bits: int) -> tuple[int, int]:
    if bits not in _LAYOUT:
        raise ValueError(f"cannot pack {bits}-bit codes; supported widths: {list(SUPPORTED_BITS)}")
    return _LAYOUT[bits]


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` codes occupies."""
    per, nbytes = _layout(bits)
    return math.ceil(n / per) * nbytes


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (rows are packed along the last one)")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"{bits}-bit codes must lie in 0..{(1 << bits) - 1}, got {int(codes.min())}..{int(codes.max())}")


def _grouped(codes: torch.Tensor, per: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., n) -> (..., ceil(n/per), per), zero-padded, in ``dtype``."""
    n = codes.shape[-1]
    pad = (-n) % per
    c = codes.to(dtype)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    return c.reshape(*codes.shape[:-1], (n + pad) // per, per)


def _pack_narrow(codes: torch.Tensor, bits: int) -> torch.Tensor:
    # 1, 2, 4 bits: `per` codes OR-ed into one byte.
    _check_codes(codes, bits)
    per, _ = _layout(bits)
    g = _grouped(codes, per, torch.uint8)  # (..., m, per)
    out = g[..., 0].clone()
    for j in range(1, per):
        out |= g[..., j] << (bits * j)
    return out  # (..., m)


def _unpack_narrow(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per, _ = _layout(bits)
    _check_packed(packed, bits, n)
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    out = torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)
    return out[..., :n]


def _check_packed(packed: torch.Tensor, bits: int, n: int) -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed data must be uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != packed_row_bytes(n, bits):
        have = tuple(packed.shape)
        raise ValueError(f"packed rows of {n} {bits}-bit codes need {packed_row_bytes(n, bits)} bytes; got shape {have}")


def pack_1bit(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) codes in {0, 1} -> (..., ceil(n/8)) uint8, 8 codes per byte."""
    return _pack_narrow(codes, 1)


def unpack_1bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_1bit`: (..., ceil(n/8)) uint8 -> (..., n) uint8 codes."""
    return _unpack_narrow(packed, 1, n)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) codes in 0..3 -> (..., ceil(n/4)) uint8, 4 codes per byte."""
    return _pack_narrow(codes, 2)


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`."""
    return _unpack_narrow(packed, 2, n)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) codes in 0..15 -> (..., ceil(n/2)) uint8, 2 codes per byte."""
    return _pack_narrow(codes, 4)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`."""
    return _unpack_narrow(packed, 4, n)


def pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) codes in 0..7 -> (..., 3*ceil(n/8)) uint8: exactly 3 bits per weight, 8 codes in 3 bytes."""
    _check_codes(codes, 3)
    g = _grouped(codes, 8, torch.int32)  # (..., m, 8)
    word = g[..., 0].clone()  # (..., m) 24-bit little-endian word
    for j in range(1, 8):
        word |= g[..., j] << (3 * j)
    out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(3)], dim=-1).to(torch.uint8)  # (..., m, 3)
    return out.reshape(*codes.shape[:-1], out.shape[-2] * 3)


def unpack_3bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_3bit`: (..., 3*ceil(n/8)) uint8 -> (..., n) uint8 codes."""
    _check_packed(packed, 3, n)
    m = packed.shape[-1] // 3
    b = packed.reshape(*packed.shape[:-1], m, 3).to(torch.int32)  # (..., m, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (..., m)
    parts = [((word >> (3 * j)) & 7) for j in range(8)]
    out = torch.stack(parts, dim=-1).to(torch.uint8).reshape(*packed.shape[:-1], m * 8)
    return out[..., :n]


_PACK = {1: pack_1bit, 2: pack_2bit, 3: pack_3bit, 4: pack_4bit}
_UNPACK = {1: unpack_1bit, 2: unpack_2bit, 3: unpack_3bit, 4: unpack_4bit}


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (..., n) at ``bits`` per code (dispatch to ``pack_<bits>bit``)."""
    _layout(bits)
    return _PACK[bits](codes)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack rows of ``n`` codes (dispatch to ``unpack_<bits>bit``)."""
    _layout(bits)
    return _UNPACK[bits](packed, n)
