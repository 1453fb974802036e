"""Whole-model bit-allocation time from synthetic statistics, per-layer and global, per solver.

Sizes: Mixtral-8x7B (32 MoE layers x 8 experts, top-2) and DeepSeek-VL2 (30 x 72, top-6 of the 64 routed experts
is the 27B model's layout; 72 is the full DeepSeek-VL2 expert count the issue asks for). Statistics are random but
shaped like real ones: Dirichlet access frequencies, weights correlated with them, eps falling with the width.

    .venv/bin/python benchmarks/bench_allocation.py            # all sizes, solvers, scopes; a table on stdout
    .venv/bin/python benchmarks/bench_allocation.py --repeat 5 --json out.json

Timings are wall-clock on a shared machine: compare rows of the same run (the ratio column is against CBC
per-layer for the same model size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcmoe_vl.allocation.allocators import LayerInputs, allocate_layers  # noqa: E402
from mcmoe_vl.allocation.budget import BudgetKind  # noqa: E402
from mcmoe_vl.allocation.config import AllocationConfig, Scope  # noqa: E402
from mcmoe_vl.allocation.program import Solver  # noqa: E402

SIZES = {"mixtral-8x7b (32x8)": (32, 8, 2), "deepseek-vl2 (30x72)": (30, 72, 6)}


def synthetic_layers(n_layers: int, n_experts: int, top_k: int, seed: int = 0, tokens: int = 262144,
                     bits: tuple[int, ...] = (1, 2, 3, 4)) -> list[LayerInputs]:
    rng = np.random.default_rng(seed)
    out = []
    for li in range(n_layers):
        phi = rng.dirichlet(np.full(n_experts, 0.7))
        counts = rng.multinomial(tokens * top_k, phi)
        wsum = counts * rng.uniform(0.1, 0.6, n_experts)
        base = rng.lognormal(0.0, 0.5, n_experts)
        eps = {b: base * 2.0 ** (-b) * rng.uniform(0.9, 1.1, n_experts) for b in bits}
        hawq = {b: (base * 2.0 ** (-b)) ** 2 * rng.uniform(0.5, 2.0, n_experts) for b in bits}
        out.append(LayerInputs(index=li, path=f"model.layers.{li}.mlp", counts=counts, weight_sum=wsum,
                               eps=eps, hawq=hawq))
    return out


def time_it(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--target", type=float, default=2.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for size, (L, n, k) in SIZES.items():
        layers = synthetic_layers(L, n, k)
        base = None
        for budget in (BudgetKind.NOMINAL, BudgetKind.EFFECTIVE):
            target = args.target if budget is BudgetKind.NOMINAL else args.target + 0.25
            for scope in (Scope.LAYER, Scope.GLOBAL):
                for solver in (Solver.CBC, Solver.SCIP, Solver.DP):
                    cfg = AllocationConfig(method="pmq", target_bits=target, budget=budget, scope=scope,
                                           solver=solver)
                    t = time_it(lambda: allocate_layers(layers, cfg), args.repeat)
                    if base is None:
                        base = t
                    rows.append({"model": size, "budget": budget.value, "target": target, "scope": scope.value,
                                 "solver": solver.value, "seconds": t, "vs_cbc_layer": t / base})
    print(f"{'model':22} {'budget':9} {'target':>6} {'scope':7} {'solver':6} {'seconds':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:22} {r['budget']:9} {r['target']:6.2f} {r['scope']:7} {r['solver']:6} "
              f"{r['seconds']:8.3f} {r['vs_cbc_layer']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
