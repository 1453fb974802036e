"""Bit widths: the one place a width is validated.

The engine packs routed experts (and every other quantized linear layer) at :data:`QUANT_WIDTHS` bits; a plan may
also keep a module at :data:`UNQUANTIZED` (16 bits, stored as is). Every config and plan that names widths (the
suite recipe's ``bits``, :class:`~mcmoe_vl.allocation.config.AllocationConfig`, the calibration's ``eps_bits``, the bit
plan) validates them with :func:`check_widths`, so they cannot disagree about what a valid width is::

    check_widths([1, 2, 3], where="bits")                      # -> (1, 2, 3)
    check_widths([2, 16], where="plan", unquantized=True)     # -> (2, 16)
"""

from __future__ import annotations

from collections.abc import Iterable

QUANT_WIDTHS = (1, 2, 3, 4)  # what mcmoe_vl.quant.packing stores
UNQUANTIZED = 16  # a module kept in 16 bits


def valid_widths(*, unquantized: bool = False) -> tuple[int, ...]:
    return QUANT_WIDTHS + ((UNQUANTIZED,) if unquantized else ())


def check_width(bits: int, *, where: str, unquantized: bool = False) -> int:
    """``bits`` if it is a width the engine stores, else a ValueError naming ``where`` and the valid widths."""
    valid = valid_widths(unquantized=unquantized)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in valid:
        extra = f" ({UNQUANTIZED} = unquantized)" if unquantized else ""
        raise ValueError(f"{where}: width {bits!r} is not supported; valid widths: {list(valid)}{extra}")
    return bits


def check_widths(bits: Iterable[int], *, where: str, unquantized: bool = False, unique: bool = False
                 ) -> tuple[int, ...]:
    """Every width of ``bits`` checked by :func:`check_width`; ``unique``: repeats are an error too."""
    out = tuple(bits)
    for i, b in enumerate(out):
        check_width(b, where=f"{where}[{i}]", unquantized=unquantized)
    if unique and len(set(out)) != len(out):
        raise ValueError(f"{where}: widths repeat: {list(out)}")
    return out
