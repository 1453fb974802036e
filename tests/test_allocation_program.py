"""The allocation integer program: optimum equals brute force, constraints hold, budgets resolve correctly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mcmoe_vl.allocation.budget import (
    AllocationError,
    BudgetKind,
    UnitCosts,
    effective_bits,
    reachable_mask,
    resolve_budget,
    sumset,
)
from mcmoe_vl.allocation.program import Block, Solver, objective, solve


def brute_force(blocks: list[Block], costs: tuple[int, ...], units: int, exact: bool) -> float:
    """Minimum objective by enumerating every assignment of every block."""
    per_block = []
    for b in blocks:
        n, m = b.cost.shape
        options: dict[int, float] = {}  # total units -> min cost with the block's constraints met
        for x in itertools.product(range(m), repeat=n):
            if not all(r in x for r in b.required):
                continue
            u = sum(costs[j] for j in x)
            c = float(b.cost[np.arange(n), list(x)].sum())
            options[u] = min(options.get(u, np.inf), c)
        per_block.append(options)
    best = np.inf
    for combo in itertools.product(*(o.items() for o in per_block)):
        u = sum(k for k, _ in combo)
        if (u == units) if exact else (u <= units):
            best = min(best, sum(v for _, v in combo))
    return best


def _check_constraints(blocks, choices, costs, budget):
    total = 0
    for b, c in zip(blocks, choices):
        assert c.shape == (b.cost.shape[0],)
        for r in b.required:
            assert (c == r).sum() >= 1
        total += sum(costs[j] for j in c)
    assert total == budget.units if budget.exact else total <= budget.units


@pytest.mark.parametrize("kind", list(BudgetKind))
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("solver", list(Solver))
def test_layer_program_matches_brute_force(kind, seed, solver):
    rng = np.random.default_rng(seed)
    bits = (1, 2, 3)
    units = UnitCosts.build(bits, kind)
    # Costs that fall with the width (as eps does) but not uniformly, so the optimum is not trivial.
    cost = np.sort(rng.random((6, 3)), axis=1)[:, ::-1] * rng.random((6, 1))
    block = Block("layer 0", cost, (1, 2))
    target = [1.5, 2.0, 2.25, 2.54][seed] if kind is BudgetKind.NOMINAL else [1.8, 2.25, 2.5, 2.9][seed]
    budget = resolve_budget("layer 0", 6, target, units, reachable_mask(6, units.costs, (1, 2)))
    (choice,) = solve([block], units.costs, budget, solver)
    _check_constraints([block], [choice], units.costs, budget)
    ref = brute_force([block], units.costs, budget.units, budget.exact)
    assert np.isfinite(ref)
    assert objective([block], [choice]) == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("solver", list(Solver))
def test_global_program_matches_brute_force(seed, solver):
    rng = np.random.default_rng(100 + seed)
    units = UnitCosts.build((1, 2, 3), BudgetKind.NOMINAL)
    blocks = [Block(f"layer {i}", np.sort(rng.random((4, 3)), axis=1)[:, ::-1] * (1 + 5 * i), (1, 2))
              for i in range(2)]
    masks = [reachable_mask(4, units.costs, (1, 2)) for _ in blocks]
    budget = resolve_budget("model", 8, 2.0, units, sumset(masks))
    assert budget.exact and budget.units == 16
    choices = solve(blocks, units.costs, budget, solver)
    _check_constraints(blocks, choices, units.costs, budget)
    assert objective(blocks, choices) == pytest.approx(brute_force(blocks, units.costs, 16, True), rel=1e-9)
    # The global optimum is never worse than the per-layer one at the same average.
    per_layer = [solve([b], units.costs, resolve_budget(b.name, 4, 2.0, units, m), solver)[0]
                 for b, m in zip(blocks, masks)]
    assert objective(blocks, choices) <= objective(blocks, per_layer) + 1e-12


def test_four_widths_match_brute_force():
    rng = np.random.default_rng(7)
    units = UnitCosts.build((1, 2, 3, 4), BudgetKind.NOMINAL)
    cost = np.sort(rng.random((5, 4)), axis=1)[:, ::-1].copy()
    block = Block("layer 0", cost, (1, 2))
    budget = resolve_budget("layer 0", 5, 2.4, units, reachable_mask(5, units.costs, (1, 2)))
    assert budget.exact and budget.units == 12
    for solver in Solver:
        (c,) = solve([block], units.costs, budget, solver)
        assert objective([block], [c]) == pytest.approx(brute_force([block], units.costs, 12, True))


def test_unreachable_non_integer_budget_uses_at_most_and_reports():
    units = UnitCosts.build((1, 2, 3), BudgetKind.NOMINAL)
    mask = reachable_mask(8, units.costs, (1, 2))
    b = resolve_budget("layer 0", 8, 2.54, units, mask)  # 8 * 2.54 = 20.32 units
    assert (b.units, b.exact) == (20, False)
    b = resolve_budget("layer 0", 8, 2.5, units, mask)
    assert (b.units, b.exact) == (20, True)
    # widths {2, 4}: odd totals cannot be reached, so 5 experts at 2.2 bits (11 units) becomes <= 11.
    u24 = UnitCosts.build((2, 4), BudgetKind.NOMINAL)
    b = resolve_budget("layer 0", 5, 2.2, u24, reachable_mask(5, u24.costs, ()))
    assert (b.units, b.exact) == (11, False)


def test_reachable_range_and_errors_name_layer_and_range():
    units = UnitCosts.build((1, 2, 3), BudgetKind.NOMINAL)
    mask = reachable_mask(8, units.costs, (1, 2))
    # One 3-bit and one 2-bit expert, the rest 1 bit: 11 units; one 2-bit, the rest 3 bits: 23 units.
    assert np.flatnonzero(mask).tolist() == list(range(11, 24))
    with pytest.raises(AllocationError, match=r"layer 5.*outside the reachable range \[1.375, 2.875\]"):
        resolve_budget("layer 5", 8, 1.0, units, mask)
    with pytest.raises(AllocationError, match=r"layer 5.*\[1.375, 2.875\]"):
        resolve_budget("layer 5", 8, 3.0, units, mask)
    with pytest.raises(AllocationError, match="no assignment of 1 experts"):
        resolve_budget("layer 2", 1, 2.0, units, reachable_mask(1, units.costs, (1, 2)))
    with pytest.raises(AllocationError, match="finite"):
        resolve_budget("layer 2", 8, float("nan"), units, mask)


def test_effective_units_are_exact_bits_per_group():
    units = UnitCosts.build((1, 2, 3, 4), BudgetKind.EFFECTIVE, group_size=128)
    for w, c in zip(units.widths, units.costs):
        assert c / units.scale == pytest.approx(effective_bits(w, group_size=128))
    assert effective_bits(2) == 2.25 and effective_bits(1) == 1.125


def test_solvers_are_deterministic_and_agree():
    rng = np.random.default_rng(3)
    units = UnitCosts.build((1, 2, 3), BudgetKind.NOMINAL)
    blocks = [Block(f"layer {i}", np.sort(rng.random((16, 3)), axis=1)[:, ::-1].copy(), (1, 2)) for i in range(3)]
    budget = resolve_budget("model", 48, 2.1, units, sumset([reachable_mask(16, units.costs, (1, 2))] * 3))
    runs = {s: [solve(blocks, units.costs, budget, s) for _ in range(2)] for s in Solver}
    for s, (a, b) in runs.items():
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), s
    objs = {s: objective(blocks, r[0]) for s, r in runs.items()}
    assert max(objs.values()) - min(objs.values()) < 1e-9


def test_malformed_costs_are_rejected():
    with pytest.raises(AllocationError, match="layer 1.*finite"):
        Block("layer 1", np.array([[1.0, np.nan]]), ())
    with pytest.raises(AllocationError, match="layer 1.*shape"):
        Block("layer 1", np.zeros((0, 3)), ())
