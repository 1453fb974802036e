"""Bit budgets: what one weight costs at each width, in nominal or effective bits, as exact integers.

Nominal bits (the paper's accounting) count only the codes: a j-bit expert costs j bits per weight. Effective bits
add the quantizer parameters stored per (row, group of ``group_size`` weights): a 16-bit scale and a 16-bit zero
for widths >= 2 (asymmetric min-max), a 16-bit scale only for 1 bit (binarisation ``s * sign(W)``). At group size
128 a 2-bit expert is 2 + 32/128 = 2.25 effective bits per weight, a 1-bit expert 1 + 16/128 = 1.125.

:func:`storage_overhead_bits` is the single definition of that overhead in the allocator; the quantization engine's
accounting (``mcmoe_vl.quant.accounting``) measures the real stored bytes, which must agree with it.

To solve the integer program exactly, each width's cost is turned into an integer number of *units*
(:class:`UnitCosts`): nominal costs are the widths themselves; effective costs are bits per group
(``j * g + overhead``), divided by the greatest common divisor of all costs and ``g``. A budget of ``k`` average
bits over ``n`` experts is then ``n * k * scale`` units.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import reduce

import numpy as np


class BudgetKind(str, enum.Enum):
    """Which bits the target average counts."""

    NOMINAL = "nominal"  # codes only (the paper's "2.54 bits")
    EFFECTIVE = "effective"  # codes plus per-group scale / zero


class AllocationError(ValueError):
    """An allocation request that cannot be met or is malformed; the message names the layer and valid range."""


def storage_overhead_bits(width: int, *, group_size: int = 128, param_bits: int = 16) -> float:
    """Extra bits per weight for the quantizer parameters of a ``width``-bit weight.

    Widths >= 2 store a scale and a zero per (row, group): ``2 * param_bits / group_size``. One bit stores only a
    scale: ``param_bits / group_size``. Widths >= 16 are stored unquantized: no overhead.
    """
    if width >= 16:
        return 0.0
    n_params = 1 if width == 1 else 2
    return n_params * param_bits / group_size


def effective_bits(width: int, *, group_size: int = 128, param_bits: int = 16) -> float:
    """Bits per weight a ``width``-bit weight really occupies: ``width + storage_overhead_bits(width)``."""
    return width + storage_overhead_bits(width, group_size=group_size, param_bits=param_bits)


@dataclass(frozen=True)
class UnitCosts:
    """Integer cost of each width; ``scale`` units make one bit per weight."""

    widths: tuple[int, ...]
    costs: tuple[int, ...]
    scale: int
    kind: BudgetKind

    @classmethod
    def build(
        cls, widths: tuple[int, ...], kind: BudgetKind, *, group_size: int = 128, param_bits: int = 16
    ) -> UnitCosts:
        if kind is BudgetKind.NOMINAL:
            return cls(tuple(widths), tuple(widths), 1, kind)
        per_group = [w * group_size + round(storage_overhead_bits(w, group_size=group_size,
                                                                  param_bits=param_bits) * group_size)
                     for w in widths]
        d = reduce(math.gcd, per_group + [group_size])
        return cls(tuple(widths), tuple(c // d for c in per_group), group_size // d, kind)

    def bits(self, units: float, n: int) -> float:
        """Average bits per expert weight of ``units`` spread over ``n`` experts."""
        return units / (n * self.scale)

    def average(self, choice: np.ndarray) -> float:
        """Average bits (of this kind) of a choice of width indices (any shape)."""
        c = np.asarray(self.costs)[np.asarray(choice)]
        return float(c.sum()) / (c.size * self.scale)


@dataclass(frozen=True)
class Budget:
    """An integer budget in units: ``sum(costs) == units`` when ``exact``, else ``<= units``."""

    units: int
    exact: bool
    requested_bits: float


def reachable_mask(n: int, costs: tuple[int, ...], required: tuple[int, ...]) -> np.ndarray:
    """Boolean array over total units: which totals ``n`` experts can reach with >= 1 expert at each ``required``
    width index. Exact dynamic program over experts (experts are interchangeable for the total)."""
    r = len(required)
    top = n * max(costs)
    # state[f, u]: some assignment of the experts so far has total u and satisfied the required set f (bitmask)
    state = np.zeros((1 << r, top + 1), dtype=bool)
    state[0, 0] = True
    for _ in range(n):
        new = np.zeros_like(state)
        for j, c in enumerate(costs):
            bit = sum(1 << q for q, req in enumerate(required) if req == j)
            for f in range(1 << r):
                new[f | bit, c:] |= state[f, : top + 1 - c]
        state = new
    return state[(1 << r) - 1]


def sumset(masks: list[np.ndarray]) -> np.ndarray:
    """Totals reachable as one element of each mask summed (boolean convolution via FFT)."""
    out = np.ones(1, dtype=bool)
    for m in masks:
        size = out.size + m.size - 1
        nfft = 1 << (size - 1).bit_length()
        conv = np.fft.irfft(np.fft.rfft(out.astype(float), nfft) * np.fft.rfft(m.astype(float), nfft), nfft)[:size]
        out = conv > 0.5
    return out


def resolve_budget(
    name: str, n: int, target_bits: float, units: UnitCosts, reachable: np.ndarray
) -> Budget:
    """Turn a target average into an integer budget for ``n`` experts, or raise naming ``name`` and the range.

    Nominal budgets: equality when ``n * target`` is an integer the widths can reach, otherwise ``<=`` its floor
    (the achieved average is reported by the caller). Effective budgets are always a cap (``<=``): which exact
    totals the per-width costs (e.g. 9, 18, 26 units for 1, 2, 3 bits at group 128) can reach is a number-theoretic
    accident, and the equality makes the program one to two orders of magnitude slower to solve.
    """
    if not math.isfinite(target_bits):
        raise AllocationError(f"{name}: target average must be a finite number, got {target_bits!r}")
    idx = np.flatnonzero(reachable)
    if idx.size == 0:
        raise AllocationError(f"{name}: no assignment of {n} experts satisfies the width constraints")
    lo, hi = units.bits(int(idx[0]), n), units.bits(int(idx[-1]), n)
    raw = n * target_bits * units.scale
    rounded = round(raw)
    integral = abs(raw - rounded) <= 1e-6 * max(1.0, abs(raw))
    b = rounded if integral else math.floor(raw)
    if b < idx[0] or (raw > idx[-1] and not math.isclose(raw, idx[-1], rel_tol=1e-9)):
        raise AllocationError(
            f"{name}: target {target_bits:g} {units.kind.value} bits is outside the reachable range "
            f"[{lo:.4g}, {hi:.4g}] for {n} experts with widths {list(units.widths)} and the width constraints"
        )
    exact = units.kind is BudgetKind.NOMINAL and integral and bool(reachable[b])
    return Budget(units=int(min(b, idx[-1])), exact=exact, requested_bits=target_bits)
