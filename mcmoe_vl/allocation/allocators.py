"""Bit allocators: PMQ (paper Eq. 4) and the baselines of the paper's ablations, one registry.

Every allocator has the signature ``fn(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]``
(one array of expert widths in bits per layer) and is registered in :data:`ALLOCATORS`.

Program-based allocators differ only in the cost ``cost[i, j]`` of giving expert i the j-th width; all of them then
solve the same integer program (:mod:`mcmoe_vl.allocation.program`) with the same budget and width constraints, per
layer or globally (``config.scope``):

- ``pmq``: ``phi_i^alpha * w_i^beta * eps_{i,j}^gamma`` with phi and w normalised to sum to 1 in the layer.
- ``fnorm``: ``eps_{i,j}^gamma`` (the output-reconstruction F-norm alone).
- ``frequency``: ``phi_i^alpha * d_j^gamma``; ``weight``: ``w_i^beta * d_j^gamma``, where ``d_j = 2^-j`` is a
  data-free stand-in for the quantization error (the round-to-nearest step halves with each extra bit), so an
  expert's importance alone decides who gets the wider widths.
- ``hessian`` (HAWQ-v2): ``sum over the expert's matrices of Tr(H)/d_in * ||W - Q_j(W)||_F^2``.
- ``random``: i.i.d. uniform costs from ``numpy.random.default_rng(seed)``: a random plan meeting the budget and
  constraints.

Direct allocators:

- ``uniform``: every expert at the target width (the target must be one of the widths).
- ``block`` (BSP-like): whole layers at ``block_widths[1]`` bits, the rest at ``block_widths[0]``, as many high
  layers as the budget allows; layers are ranked by the PMQ cost of putting the whole layer at the low width
  (the first layers when no eps table is available).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mcmoe_vl.registry import Registry

from .budget import AllocationError, BudgetKind, UnitCosts, effective_bits, reachable_mask, resolve_budget, sumset
from .config import AllocationConfig, Scope
from .program import Block, solve

log = logging.getLogger(__name__)

Allocator = Callable[[list["LayerInputs"], AllocationConfig], list[np.ndarray]]

ALLOCATORS: Registry[Allocator] = Registry(
    "allocator",
    entry_point_group="mcmoe_vl.allocators",
    how_to_add="Register one with @ALLOCATORS.register(name) in mcmoe_vl.allocation.allocators.",
)


@dataclass
class LayerInputs:
    """What an allocator knows about one MoE layer (plain arrays, from the calibration statistics)."""

    index: int
    path: str
    counts: np.ndarray  # (n,) top-k selections per expert
    weight_sum: np.ndarray  # (n,) summed pre-renormalisation routing probability
    eps: dict[int, np.ndarray] = field(default_factory=dict)  # width -> (n,)
    hawq: dict[int, np.ndarray] = field(default_factory=dict)  # width -> (n,)

    @property
    def n(self) -> int:
        return int(self.counts.shape[0])

    @property
    def name(self) -> str:
        return f"layer {self.index} ({self.path})"

    def phi(self) -> np.ndarray:
        """Access frequency normalised to sum to 1 in the layer."""
        return _normalised(self.counts.astype(np.float64), self.name, "access frequency")

    def w(self) -> np.ndarray:
        """Activation weight normalised to sum to 1 in the layer."""
        return _normalised(self.weight_sum.astype(np.float64), self.name, "activation weight")

    def table(self, which: str, bits: tuple[int, ...]) -> np.ndarray:
        """(n, m) eps or hawq values for ``bits``, or an error naming what is missing."""
        src = self.eps if which == "eps" else self.hawq
        missing = [b for b in bits if b not in src]
        if missing:
            raise AllocationError(
                f"{self.name}: the statistics have no {which} for widths {missing} (have {sorted(src)}); "
                f"re-run calibration with those widths (mcmoe-vl calibrate --eps-bits ...)"
            )
        return np.stack([np.asarray(src[b], dtype=np.float64) for b in bits], axis=1)


def _normalised(v: np.ndarray, name: str, what: str) -> np.ndarray:
    s = v.sum()
    if not np.isfinite(s) or s <= 0 or (v < 0).any():
        raise AllocationError(f"{name}: {what} must be non-negative with a positive sum (no calibration tokens?)")
    return v / s


# -- the shared program driver -------------------------------------------------------------------------------------

def units_for(config: AllocationConfig, bits: tuple[int, ...] | None = None) -> UnitCosts:
    return UnitCosts.build(bits or config.bits, config.budget, group_size=config.group_size,
                           param_bits=config.param_bits)


def solve_costs(layers: list[LayerInputs], costs: list[np.ndarray], config: AllocationConfig) -> list[np.ndarray]:
    """Solve the allocation program for the given per-layer cost matrices; returns widths per layer."""
    units = units_for(config)
    if config.per_layer_uniform:
        return solve_per_layer_uniform(layers, costs, config, units)
    required = tuple(config.bits.index(w) for w in config.required)
    blocks = [Block(la.name, c, required) for la, c in zip(layers, costs, strict=True)]
    masks = [reachable_mask(la.n, units.costs, required) for la in layers]
    widths = np.asarray(config.bits)
    if config.scope is Scope.LAYER:
        out = []
        for la, b, m in zip(layers, blocks, masks):
            budget = resolve_budget(la.name, la.n, config.target_bits, units, m)
            (choice,) = solve([b], units.costs, budget, config.solver, time_limit_s=config.time_limit_s)
            out.append(widths[choice])
        return out
    total = sum(la.n for la in layers)
    budget = resolve_budget(f"model ({len(layers)} MoE layers, {total} experts)", total, config.target_bits,
                            units, sumset(masks))
    choices = solve(blocks, units.costs, budget, config.solver, time_limit_s=config.time_limit_s)
    return [widths[c] for c in choices]


def solve_per_layer_uniform(layers: list[LayerInputs], costs: list[np.ndarray], config: AllocationConfig,
                            units: UnitCosts) -> list[np.ndarray]:
    """One width per layer minimising the summed cost within the model-wide budget: an exact dynamic program over
    (layer, total units), each layer spending ``n * units[j]`` for width j at cost ``sum_i cost[i, j]``."""
    widths = np.asarray(config.bits)
    spend = [np.asarray(units.costs, dtype=np.int64) * la.n for la in layers]  # (m,) per layer
    top = int(sum(s.max() for s in spend))
    masks = []
    for s in spend:
        m = np.zeros(int(s.max()) + 1, dtype=bool)
        m[s] = True
        masks.append(m)
    total = sum(la.n for la in layers)
    budget = resolve_budget(f"model ({len(layers)} MoE layers, one width per layer)", total, config.target_bits,
                            units, sumset(masks))
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    picks = []
    for s, c in zip(spend, costs, strict=True):
        layer_cost = c.sum(axis=0)  # (m,)
        new, pick = np.full(top + 1, np.inf), np.full(top + 1, -1, dtype=np.int64)
        for j, (u, v) in enumerate(zip(s, layer_cost)):
            cand = np.full(top + 1, np.inf)
            cand[u:] = best[: top + 1 - u] + v
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    allowed = np.arange(top + 1) == budget.units if budget.exact else np.arange(top + 1) <= budget.units
    end = int(np.argmin(np.where(allowed, best, np.inf)))
    if not np.isfinite(best[end]):
        raise AllocationError(f"no per-layer-uniform assignment meets the budget of {config.target_bits:g} bits")
    chosen = []
    for s, pick in zip(reversed(spend), reversed(picks)):  # backtrack from the best reachable total
        j = int(pick[end])
        chosen.append(j)
        end -= int(s[j])
    chosen.reverse()
    return [np.full(la.n, widths[j], dtype=np.int64) for la, j in zip(layers, chosen)]


def _proxy_error(bits: tuple[int, ...]) -> np.ndarray:
    return 2.0 ** -np.asarray(bits, dtype=np.float64)  # (m,)


# -- the allocators ----------------------------------------------------------------------------------------------

@ALLOCATORS.register("pmq")
def pmq(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """Paper Eq. 4: ``phi^alpha * w^beta * eps^gamma``."""
    costs = [(la.phi() ** config.alpha * la.w() ** config.beta)[:, None] * la.table("eps", config.bits) ** config.gamma
             for la in layers]
    return solve_costs(layers, costs, config)


@ALLOCATORS.register("fnorm")
def fnorm(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """eps only: ``eps^gamma``."""
    return solve_costs(layers, [la.table("eps", config.bits) ** config.gamma for la in layers], config)


@ALLOCATORS.register("frequency")
def frequency(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """Access frequency only: ``phi^alpha * (2^-j)^gamma``."""
    d = _proxy_error(config.bits) ** config.gamma
    return solve_costs(layers, [(la.phi() ** config.alpha)[:, None] * d[None] for la in layers], config)


@ALLOCATORS.register("weight")
def weight(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """Activation weight only: ``w^beta * (2^-j)^gamma``."""
    d = _proxy_error(config.bits) ** config.gamma
    return solve_costs(layers, [(la.w() ** config.beta)[:, None] * d[None] for la in layers], config)


@ALLOCATORS.register("hessian")
def hessian(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """HAWQ-v2: ``Tr(H)/d * ||W - Q_j(W)||^2`` per expert (from the calibration pass)."""
    return solve_costs(layers, [la.table("hawq", config.bits) for la in layers], config)


@ALLOCATORS.register("random")
def random(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """A seeded random plan meeting the budget and constraints (uniform random costs)."""
    rng = np.random.default_rng(config.seed)
    return solve_costs(layers, [rng.random((la.n, len(config.bits))) for la in layers], config)


@ALLOCATORS.register("uniform")
def uniform(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """Every expert at the target width."""
    def cost(b: int) -> float:
        return float(b) if config.budget is BudgetKind.NOMINAL else effective_bits(
            b, group_size=config.group_size, param_bits=config.param_bits)

    match = [b for b in config.bits if abs(cost(b) - config.target_bits) < 1e-9]
    if not match:
        valid = ", ".join(f"{cost(b):g}" for b in config.bits)
        raise AllocationError(
            f"all layers: uniform allocation needs a target equal to one width's {config.budget.value} bits "
            f"({valid}), got {config.target_bits:g}"
        )
    return [np.full(la.n, match[0], dtype=np.int64) for la in layers]


@ALLOCATORS.register("pmq+")
def pmq_plus(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """Candidate plans chosen by measured calibration loss: needs the model and data, not statistics alone."""
    raise AllocationError(
        "pmq+ measures candidate plans on the model: call mcmoe_vl.allocation.plus.allocate_plus(model, stats, "
        "fit_batches, select_batches, config, adapter=adapter), or mcmoe-vl allocate STATS --method pmq+ --model DIR "
        "--data DATA"
    )


@ALLOCATORS.register("block")
def block(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """BSP-like: whole layers at the high width, the rest at the low width, within the model-wide budget."""
    lo, hi = config.block_widths
    units = units_for(config, (lo, hi))
    n_total = sum(la.n for la in layers)
    raw = config.target_bits * n_total * units.scale
    base = units.costs[0] * n_total
    top = units.costs[1] * n_total
    if raw < base - 1e-6 or raw > top + 1e-6:
        raise AllocationError(
            f"all layers: the block allocation reaches {units.bits(base, n_total):g}..{units.bits(top, n_total):g} "
            f"{config.budget.value} bits with widths {lo}/{hi}, got target {config.target_bits:g}"
        )
    # Rank layers: the most costly at the low width first (ties: earlier layer first).
    scores = []
    for la in layers:
        if lo in la.eps:
            scores.append(float((la.phi() ** config.alpha * la.w() ** config.beta
                                 * np.asarray(la.eps[lo], dtype=np.float64) ** config.gamma).sum()))
        else:
            scores.append(0.0)
    order = sorted(range(len(layers)), key=lambda li: (-scores[li], li))
    step = units.costs[1] - units.costs[0]
    used = base
    out = [np.full(la.n, lo, dtype=np.int64) for la in layers]
    for li in order:
        extra = step * layers[li].n
        if used + extra <= raw + 1e-6:
            out[li][:] = hi
            used += extra
    return out


def allocate_layers(layers: list[LayerInputs], config: AllocationConfig) -> list[np.ndarray]:
    """Run the configured allocator and check its output (one width per expert, total within the budget)."""
    if not layers:
        raise AllocationError("no MoE layers to allocate (are the statistics empty?)")
    fn = ALLOCATORS.get(config.method)
    out = fn(layers, config)
    for la, w in zip(layers, out, strict=True):
        if w.shape != (la.n,):
            raise AssertionError(f"{config.method} returned {w.shape} widths for {la.name} with {la.n} experts")
    return out


__all__ = ["ALLOCATORS", "LayerInputs", "allocate_layers", "solve_costs"]
