"""The bit-allocation integer program (MC-MoE paper Eq. 4) and an exact dynamic program that cross-checks it.

For one or more MoE layers ("blocks"), each with a cost matrix ``cost[i, j]`` (expert i at the j-th allowed width):

    minimise   sum_i sum_j cost[i, j] * x[i, j]
    subject to sum_j x[i, j] = 1                        every expert gets one width
               sum_i sum_j units[j] * x[i, j] = B       (or <= B; summed over all blocks: one budget)
               sum_i x[i, r] >= 1                       for each required width r, in every block
               x binary

PMQ's cost is ``phi_i^alpha * w_i^beta * eps_{i,j}^gamma`` (see :mod:`mcmoe_vl.allocation.allocators`); a per-layer
allocation solves one program per layer, the global allocation one program over all layers with one budget.

Solvers: OR-tools' MIP interface (CBC or SCIP, relative gap 0, one thread: deterministic), or the exact dynamic
program over (expert, units used, required widths met) -- a multiple-choice knapsack -- whose global form combines
the per-layer cost-versus-units curves by a min-plus convolution.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np

from .budget import AllocationError, Budget

log = logging.getLogger(__name__)


class Solver(str, enum.Enum):
    CBC = "cbc"
    SCIP = "scip"
    DP = "dp"


@dataclass(frozen=True)
class Block:
    """One layer's part of a program."""

    name: str  # for messages: "layer 3 (model.layers.3.mlp)"
    cost: np.ndarray  # (n, m) finite, >= 0
    required: tuple[int, ...]  # width indices that need at least one expert

    def __post_init__(self) -> None:
        c = self.cost
        if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
            raise AllocationError(f"{self.name}: cost matrix must be (experts, widths), got shape {c.shape}")
        if not np.all(np.isfinite(c)) or (c < 0).any():
            raise AllocationError(f"{self.name}: costs must be finite and >= 0 (check the calibration statistics)")


def solve(blocks: list[Block], units: tuple[int, ...], budget: Budget, solver: Solver = Solver.CBC,
          *, time_limit_s: float = 60.0) -> list[np.ndarray]:
    """Optimal width indices (n,) per block. One budget over all blocks."""
    if solver is Solver.DP:
        out = solve_dp(blocks, units, budget)
    else:
        out = solve_mip(blocks, units, budget, solver, time_limit_s=time_limit_s)
    check_solution(blocks, units, budget, out)
    return out


def check_solution(blocks: list[Block], units: tuple[int, ...], budget: Budget, choices: list[np.ndarray]) -> None:
    """Raise if a solver's answer breaks a constraint (guards against solver tolerances)."""
    total = 0
    for b, c in zip(blocks, choices, strict=True):
        if c.shape != (b.cost.shape[0],):
            raise AssertionError(f"{b.name}: solver returned {c.shape} choices for {b.cost.shape[0]} experts")
        missing = [r for r in b.required if not (c == r).any()]
        if missing:
            raise AssertionError(f"{b.name}: solver left required width indices {missing} without an expert")
        total += int(np.asarray(units)[c].sum())
    if total > budget.units or (budget.exact and total != budget.units):
        raise AssertionError(f"solver total {total} units breaks the budget {budget}")


def solve_mip(blocks: list[Block], units: tuple[int, ...], budget: Budget, solver: Solver = Solver.CBC,
              *, time_limit_s: float = 60.0) -> list[np.ndarray]:
    """Solve with OR-tools' MIP interface (pywraplp)."""
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver(solver.value.upper())
    if s is None:  # pragma: no cover - depends on the OR-tools build
        raise RuntimeError(f"OR-tools has no {solver.value} backend in this build")
    s.SetNumThreads(1)
    s.SetTimeLimit(int(time_limit_s * 1000))
    # Costs differ by orders of magnitude between models; the optimum is scale-free, the solver's tolerances are not.
    top = max(float(b.cost.max()) for b in blocks)
    scale = 1.0 / top if top > 0 else 1.0
    inf = s.infinity()
    lb = budget.units if budget.exact else -inf
    cap = s.Constraint(lb, budget.units, "budget")
    obj = s.Objective()
    xs: list[list[list]] = []
    for bi, b in enumerate(blocks):
        n, m = b.cost.shape
        req = [s.Constraint(1, inf, f"req_{bi}_{r}") for r in b.required]
        xb = []
        for i in range(n):
            one = s.Constraint(1, 1, f"one_{bi}_{i}")
            row = []
            for j in range(m):
                x = s.BoolVar(f"x_{bi}_{i}_{j}")
                one.SetCoefficient(x, 1)
                cap.SetCoefficient(x, units[j])
                obj.SetCoefficient(x, float(b.cost[i, j]) * scale)
                for c, r in zip(req, b.required):
                    if r == j:
                        c.SetCoefficient(x, 1)
                row.append(x)
            xb.append(row)
        xs.append(xb)
    obj.SetMinimization()
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, 0.0)
    status = s.Solve(params)
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        names = ", ".join(b.name for b in blocks[:3]) + (" ..." if len(blocks) > 3 else "")
        raise AllocationError(f"{names}: the integer program has no solution (solver status {status})")
    if status != pywraplp.Solver.OPTIMAL:
        log.warning("%s stopped at its time limit (%.0f s) with a feasible, possibly suboptimal plan",
                    solver.value, time_limit_s)
    out = []
    for xb in xs:
        out.append(np.array([int(np.argmax([x.solution_value() for x in row])) for row in xb], dtype=np.int64))
    return out


# -- exact dynamic program -----------------------------------------------------------------------------------------

def layer_curve(block: Block, units: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Min cost of ``block`` for every exact total of units, with its required widths met.

    Returns ``curve`` (U+1,) (inf where unreachable) and back-pointer tables (2, n, F, U+1) int8 -- the width
    chosen for expert i and the required-set state before it, over the states F -- used by :func:`backtrack`.
    """
    n, m = block.cost.shape
    r = len(block.required)
    top = n * max(units)
    F = 1 << r
    best = np.full((F, top + 1), np.inf)
    best[0, 0] = 0.0
    choice = np.full((n, F, top + 1), -1, dtype=np.int8)
    prev_state = np.zeros((n, F, top + 1), dtype=np.int8)
    for i in range(n):
        new = np.full_like(best, np.inf)
        for j in range(m):
            c = units[j]
            bit = sum(1 << q for q, req in enumerate(block.required) if req == j)
            for f in range(F):
                g = f | bit
                cand = best[f, : top + 1 - c] + block.cost[i, j]
                cur = new[g, c:]
                better = cand < cur  # strict: the first (lowest width, lowest state) optimum wins ties
                cur[better] = cand[better]
                choice[i, g, c:][better] = j
                prev_state[i, g, c:][better] = f
        best = new
    return best[F - 1], np.stack([choice, prev_state])


def backtrack(tables: np.ndarray, units: tuple[int, ...], total: int) -> np.ndarray:
    choice, prev_state = tables
    n, F, _ = choice.shape
    out = np.zeros(n, dtype=np.int64)
    f, u = F - 1, total
    for i in range(n - 1, -1, -1):
        j = int(choice[i, f, u])
        if j < 0:
            raise AssertionError("backtracking reached an unreachable state")
        out[i] = j
        f, u = int(prev_state[i, f, u]), u - units[j]
    return out


def solve_dp(blocks: list[Block], units: tuple[int, ...], budget: Budget) -> list[np.ndarray]:
    """Exact optimum by dynamic programming: per block over (expert, units), then min-plus over blocks."""
    curves, tables = zip(*(layer_curve(b, units) for b in blocks))
    # total[u]: min cost of the blocks so far at exactly u units; split[l][u]: units given to block l.
    total = np.zeros(1)
    splits = []
    for curve in curves:
        size = total.size + curve.size - 1
        new = np.full(size, np.inf)
        arg = np.full(size, -1, dtype=np.int64)
        for v in np.flatnonzero(np.isfinite(curve)):
            cand = total + curve[v]
            cur = new[v : v + total.size]
            better = cand < cur
            cur[better] = cand[better]
            arg[v : v + total.size][better] = v
        total = new
        splits.append(arg)
    hi = min(budget.units, total.size - 1)
    if budget.exact:
        if not np.isfinite(total[hi]) or hi != budget.units:
            raise AllocationError(f"{blocks[0].name}: budget of {budget.units} units is not reachable")
        u = hi
    else:
        window = total[: hi + 1]
        if not np.isfinite(window).any():
            raise AllocationError(f"{blocks[0].name}: no assignment fits within {budget.units} units")
        u = int(np.argmin(window))  # lowest total among equal optima: first index
    out: list[np.ndarray] = [np.empty(0)] * len(blocks)
    for li in range(len(blocks) - 1, -1, -1):
        v = int(splits[li][u])
        out[li] = backtrack(tables[li], units, v)
        u -= v
    return out


def objective(blocks: list[Block], choices: list[np.ndarray]) -> float:
    """The program's objective for a choice of width indices."""
    return float(sum(b.cost[np.arange(b.cost.shape[0]), c].sum() for b, c in zip(blocks, choices)))
