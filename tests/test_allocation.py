"""allocate(stats, config) -> BitPlan: PMQ's optimum, the baselines, constraints, errors, determinism."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from mcmoe_vl.allocation.allocate import allocate
from mcmoe_vl.allocation.allocators import ALLOCATORS
from mcmoe_vl.allocation.budget import AllocationError, effective_bits
from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.calibration.stats import CalibrationStats, LayerStats, TokenGroupStats
from mcmoe_vl.quant.plan import BitPlan, PlanError
from mcmoe_vl.registry import RegistryError


def synthetic_stats(layers: int = 2, experts: int = 6, top_k: int = 2, seed: int = 0, tokens: int = 500,
                    bits=(1, 2, 3, 4)) -> CalibrationStats:
    rng = np.random.default_rng(seed)
    out = []
    for li in range(layers):
        counts = rng.multinomial(tokens * top_k, rng.dirichlet(np.ones(experts)))
        wsum = counts * rng.uniform(0.2, 0.6, experts)
        base = rng.lognormal(0, 0.6, experts)
        eps = {str(b): (base * 2.0 ** -b * rng.uniform(0.8, 1.2, experts)).tolist() for b in bits}
        hawq = {str(b): (base * 4.0 ** -b * rng.uniform(0.5, 2, experts)).tolist() for b in bits}
        g = TokenGroupStats(num_tokens=tokens, counts=counts.tolist(), weight_sum=wsum.tolist(),
                            weight_sum_renorm=(counts * 0.5).tolist(), weight_sum_applied=(counts * 0.5).tolist())
        out.append(LayerStats(index=li + 1, path=f"model.layers.{li + 1}.mlp", num_experts=experts, top_k=top_k,
                              scoring="softmax", all=g, hessian_trace_in=[1.0] * experts,
                              hessian_trace_mid=[1.0] * experts, eps=eps, hawq=hawq))
    return CalibrationStats(model_type="mixtral", num_decoder_layers=layers + 1,
                            moe_layer_indices=[la.index for la in out], layers=out)


def pmq_cost(la: LayerStats, bits, alpha, beta, gamma) -> np.ndarray:
    phi = np.asarray(la.all.counts, float)
    phi /= phi.sum()
    w = np.asarray(la.all.weight_sum, float)
    w /= w.sum()
    eps = np.stack([np.asarray(la.eps[str(b)]) for b in bits], 1)
    return (phi**alpha * w**beta)[:, None] * eps**gamma


def brute_force_layer(cost, bits, total, required=(2, 3)):
    n = cost.shape[0]
    best, arg = np.inf, None
    for x in itertools.product(range(len(bits)), repeat=n):
        ws = [bits[j] for j in x]
        if sum(ws) != total or not all(r in ws for r in required if r in bits):
            continue
        c = cost[np.arange(n), list(x)].sum()
        if c < best:
            best, arg = c, ws
    return best, arg


def plan_cost(plan: BitPlan, costs, bits) -> float:
    return sum(c[np.arange(len(p.bits)), [bits.index(b) for b in p.bits]].sum() for p, c in zip(plan.layers, costs))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("abg", [(1, 1, 2), (2, 0.5, 1)])
def test_pmq_layer_optimum_equals_brute_force(seed, abg):
    stats = synthetic_stats(seed=seed)
    a, b, g = abg
    cfg = AllocationConfig(target_bits=2.0, alpha=a, beta=b, gamma=g)
    plan = allocate(stats, cfg)
    for la, lp in zip(stats.layers, plan.layers):
        cost = pmq_cost(la, (1, 2, 3), a, b, g)
        ref, _ = brute_force_layer(cost, (1, 2, 3), 12)
        assert sum(lp.bits) == 12 and 3 in lp.bits and 2 in lp.bits  # exact average, paper constraints
        assert plan_cost(BitPlan(model_type="x", allocator="x", layers=[lp]), [cost], [1, 2, 3]) == \
            pytest.approx(ref, rel=1e-9)
    assert plan.achieved["nominal"] == 2.0
    assert plan.achieved["effective"] == pytest.approx(
        np.mean([effective_bits(b) for lp in plan.layers for b in lp.bits]))


def test_pmq_global_optimum_equals_brute_force():
    stats = synthetic_stats(experts=4, seed=5)
    plan = allocate(stats, AllocationConfig(target_bits=2.0, scope="global"))
    costs = [pmq_cost(la, (1, 2, 3), 1, 1, 2) for la in stats.layers]
    best = np.inf
    for t0 in range(4, 13):
        c0, _ = brute_force_layer(costs[0], (1, 2, 3), t0)
        c1, _ = brute_force_layer(costs[1], (1, 2, 3), 16 - t0)
        best = min(best, c0 + c1)
    assert sum(b for lp in plan.layers for b in lp.bits) == 16
    for lp in plan.layers:
        assert 2 in lp.bits and 3 in lp.bits
    assert plan_cost(plan, costs, [1, 2, 3]) == pytest.approx(best, rel=1e-9)


def test_gamma_is_the_eps_exponent():
    """The reference code raised eps to alpha; here gamma alone moves eps's weight."""
    stats = synthetic_stats(experts=8, seed=11)
    plans = {g: allocate(stats, AllocationConfig(target_bits=2.0, gamma=g, solver="dp")) for g in (0.5, 2, 6)}
    for g, plan in plans.items():
        for la, lp in zip(stats.layers, plan.layers):
            ref, _ = brute_force_layer(pmq_cost(la, (1, 2, 3), 1, 1, g), (1, 2, 3), 16)
            assert plan_cost(BitPlan(model_type="x", allocator="x", layers=[lp]),
                             [pmq_cost(la, (1, 2, 3), 1, 1, g)], [1, 2, 3]) == pytest.approx(ref, rel=1e-9)
    assert len({json.dumps(p.experts) for p in plans.values()}) > 1  # not vacuous: gamma changes plans


def test_four_bit_set_and_effective_budget():
    stats = synthetic_stats(experts=8, seed=2)
    plan = allocate(stats, AllocationConfig(target_bits=2.5, bits=(1, 2, 3, 4)))
    for lp in plan.layers:
        assert sum(lp.bits) == 20 and 2 in lp.bits and 3 in lp.bits and set(lp.bits) <= {1, 2, 3, 4}
    plan = allocate(stats, AllocationConfig(target_bits=2.3, budget="effective"))
    for lp in plan.layers:
        assert lp.effective <= 2.3 + 1e-12 and 2 in lp.bits and 3 in lp.bits
    assert plan.target == {"bits": 2.3, "budget": "effective"}


@pytest.mark.parametrize("method", ["pmq", "fnorm", "frequency", "weight", "hessian", "random"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_program_allocators_meet_budget_and_constraints(method, scope):
    stats = synthetic_stats(layers=3, experts=8, seed=4)
    plan = allocate(stats, AllocationConfig(method=method, target_bits=1.75, scope=scope))
    assert plan.allocator == method
    total = sum(b for lp in plan.layers for b in lp.bits)
    assert total == 42  # 24 experts x 1.75
    for lp in plan.layers:
        assert 2 in lp.bits and 3 in lp.bits
        if scope == "layer":
            assert sum(lp.bits) == 14


def test_baselines_follow_their_single_factor():
    stats = synthetic_stats(layers=1, experts=8, seed=6)
    la = stats.layers[0]
    for method, score in (("frequency", la.all.counts), ("weight", la.all.weight_sum)):
        bits = allocate(stats, AllocationConfig(method=method, target_bits=2.0)).layers[0].bits
        order = np.argsort(score)
        # A more important expert never gets fewer bits than a less important one.
        assert all(bits[order[i]] <= bits[order[i + 1]] for i in range(len(order) - 1)), (method, bits)
        assert len(set(bits)) > 1
    hawq = np.stack([la.hawq[str(b)] for b in (1, 2, 3)], 1)
    plan = allocate(stats, AllocationConfig(method="hessian", target_bits=2.0))
    ref, _ = brute_force_layer(hawq, (1, 2, 3), 16)
    assert plan_cost(plan, [hawq], [1, 2, 3]) == pytest.approx(ref, rel=1e-9)


def test_random_is_seeded():
    stats = synthetic_stats(layers=4, experts=16, seed=1)
    a = allocate(stats, AllocationConfig(method="random", seed=1))
    b = allocate(stats, AllocationConfig(method="random", seed=1))
    c = allocate(stats, AllocationConfig(method="random", seed=2))
    assert a.experts == b.experts != c.experts


def test_uniform_and_block():
    stats = synthetic_stats(layers=4, experts=6, seed=3)
    assert all(set(lp.bits) == {2} for lp in allocate(stats, AllocationConfig(method="uniform")).layers)
    with pytest.raises(AllocationError, match="uniform allocation needs a target equal to one width"):
        allocate(stats, AllocationConfig(method="uniform", target_bits=2.5))
    eff = allocate(stats, AllocationConfig(method="uniform", target_bits=3.25, budget="effective"))
    assert all(set(lp.bits) == {3} for lp in eff.layers)
    plan = allocate(stats, AllocationConfig(method="block", target_bits=3.0))
    per_layer = [set(lp.bits) for lp in plan.layers]
    assert per_layer.count({4}) == 2 and per_layer.count({2}) == 2 and plan.achieved["nominal"] == 3.0
    # The high layers are those with the largest PMQ cost at 2 bits.
    scores = [pmq_cost(la, (2,), 1, 1, 2).sum() for la in stats.layers]
    assert {i for i, s in enumerate(per_layer) if s == {4}} == set(np.argsort(scores)[-2:].tolist())
    with pytest.raises(AllocationError, match="block allocation reaches 2..4"):
        allocate(stats, AllocationConfig(method="block", target_bits=1.5))


def test_deterministic_json(tmp_path):
    stats = synthetic_stats(layers=3, experts=8, seed=9)
    for scope in ("layer", "global"):
        cfg = AllocationConfig(target_bits=2.54, scope=scope)
        p1, p2 = tmp_path / f"a_{scope}.json", tmp_path / f"b_{scope}.json"
        allocate(stats, cfg).save(p1)
        allocate(stats, cfg).save(p2)
        assert p1.read_text() == p2.read_text()
        loaded = BitPlan.load(p1)
        assert loaded.experts == allocate(stats, cfg).experts
        data = json.loads(p1.read_text())
        assert data["layers"][0]["bits"] and data["allocator"] == "pmq" and data["settings"]["gamma"] == 2.0


def test_non_integer_budget_reports_achieved_average():
    stats = synthetic_stats(layers=2, experts=8, seed=0)
    plan = allocate(stats, AllocationConfig(target_bits=2.54))  # 8 x 2.54 = 20.32 -> at most 20
    assert plan.achieved["nominal"] == 2.5 and plan.target["bits"] == 2.54


def test_errors_name_layer_and_range():
    stats = synthetic_stats(experts=8)
    with pytest.raises(AllocationError, match=r"layer 1 \(model.layers.1.mlp\).*reachable range \[1.375, 2.875\]"):
        allocate(stats, AllocationConfig(target_bits=0.5))
    with pytest.raises(AllocationError, match=r"layer 1 .*\[1.375, 2.875\]"):
        allocate(stats, AllocationConfig(target_bits=3.5))
    with pytest.raises(AllocationError, match=r"model \(2 MoE layers, 16 experts\).*reachable range"):
        allocate(stats, AllocationConfig(target_bits=0.9, scope="global"))
    with pytest.raises(ValueError, match="bit set is empty"):
        AllocationConfig(bits=())
    with pytest.raises(ValueError, match="require_widths"):
        AllocationConfig(bits=(1, 2), require_widths=(3,))
    with pytest.raises(AllocationError, match="layer 1.*no assignment of 1 experts"):
        allocate(synthetic_stats(experts=1, top_k=1), AllocationConfig())
    with pytest.raises(AllocationError, match="no eps for widths \\[4\\]"):
        allocate(synthetic_stats(bits=(1, 2, 3)), AllocationConfig(bits=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"width 5 is not supported; valid widths: \[1, 2, 3, 4\]"):
        AllocationConfig(bits=(1, 2, 3, 5))  # widths are validated once (mcmoe_vl.quant.widths), before any work
    with pytest.raises(AllocationError, match="layer 2: the statistics file describes 8 experts but the model has 64"):
        allocate(stats, experts_per_layer={1: 8, 2: 64})
    with pytest.raises(AllocationError, match="layer 3: the model has a MoE layer here"):
        allocate(stats, experts_per_layer={1: 8, 2: 8, 3: 8})
    partial = stats.model_copy(deep=True)
    partial.layers = partial.layers[:1]
    with pytest.raises(AllocationError, match=r"incomplete: MoE layers \[2\] are missing"):
        allocate(partial)
    with pytest.raises(RegistryError, match="Did you mean 'pmq'"):
        allocate(stats, AllocationConfig(method="pqm"))
    with pytest.raises(ValueError, match="extra"):
        AllocationConfig(gama=2)


def test_registry_lists_every_baseline():
    assert set(ALLOCATORS.names()) >= {"pmq", "uniform", "random", "frequency", "weight", "fnorm", "hessian",
                                       "block"}


def test_plan_rejects_other_model():
    plan = allocate(synthetic_stats(experts=8))
    plan.check_layers({1: 8, 2: 8})
    with pytest.raises(PlanError, match="layer 1: the plan gives 8 widths but the model has 72 experts"):
        plan.check_layers({1: 72, 2: 72})
    with pytest.raises(PlanError, match="no widths for MoE layer 3"):
        plan.check_layers({1: 8, 2: 8, 3: 8})
