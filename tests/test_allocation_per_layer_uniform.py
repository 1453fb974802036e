"""--per-layer-uniform: one width per layer, the model-wide budget, the brute-force optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mcmoe_vl.allocation.allocate import allocate
from mcmoe_vl.allocation.budget import AllocationError
from mcmoe_vl.allocation.config import AllocationConfig
from test_allocation import pmq_cost, synthetic_stats


@pytest.mark.parametrize("method", ["pmq", "fnorm", "hessian"])
@pytest.mark.parametrize("target", [2.0, 2.5, 2.75])
def test_one_width_per_layer_at_the_brute_force_optimum(method, target):
    stats = synthetic_stats(layers=4, experts=6, seed=3)
    plan = allocate(stats, AllocationConfig(method=method, target_bits=target, bits=(2, 3, 4),
                                            per_layer_uniform=True))
    for lp in plan.layers:
        assert len(set(lp.bits)) == 1  # what a serving engine can run: one format per layer
    chosen = [lp.bits[0] for lp in plan.layers]
    assert np.mean(chosen) <= target + 1e-9
    if method != "pmq":
        return
    costs = [pmq_cost(la, (2, 3, 4), 1, 1, 2).sum(axis=0) for la in stats.layers]  # (m,) per layer
    feasible = [c for c in itertools.product(range(3), repeat=4) if np.mean([(2, 3, 4)[j] for j in c]) <= target]
    exact = [c for c in feasible if np.isclose(np.mean([(2, 3, 4)[j] for j in c]), target)]
    best = min(sum(costs[li][j] for li, j in enumerate(c)) for c in (exact or feasible))
    got = sum(costs[li][(2, 3, 4).index(b)] for li, b in enumerate(chosen))
    assert got == pytest.approx(best, rel=1e-12)
    assert len(set(chosen)) > 1 or target in (2.0, 3.0, 4.0)  # mixed across layers when the budget needs it


def test_required_widths_conflict_and_unreachable_budget():
    with pytest.raises(ValueError, match="per_layer_uniform"):
        AllocationConfig(per_layer_uniform=True, require_widths=(2, 3))
    stats = synthetic_stats(layers=2, experts=4, seed=1)
    with pytest.raises(AllocationError, match="reachable range"):
        allocate(stats, AllocationConfig(target_bits=1.5, bits=(2, 3), per_layer_uniform=True))


def test_cli_flag(tmp_path):
    from mcmoe_vl.cli import main
    from mcmoe_vl.quant.plan import BitPlan

    from mcmoe_vl.calibration.stats import save_stats

    save_stats(synthetic_stats(layers=3, experts=4, seed=2), tmp_path / "stats.json")  # with its checksum
    rc = main(["allocate", str(tmp_path / "stats.json"), "-o", str(tmp_path / "plan.json"), "--target-bits", "2.5",
               "--bits", "2", "3", "--per-layer-uniform"])
    assert rc == 0
    plan = BitPlan.model_validate_json((tmp_path / "plan.json").read_text())
    assert all(len(set(lp.bits)) == 1 for lp in plan.layers)
