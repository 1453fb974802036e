"""pmq+ and the global program as suite recipes: the plan records the candidates, the quantized model follows it."""

from __future__ import annotations

import json

from test_suite_run import write_suite

from mcmoe_vl.evaluation.results import load_results
from mcmoe_vl.suite.load import load_suite
from mcmoe_vl.suite.runner import run_suite


def test_pmq_plus_and_global_recipes(tmp_path):
    recipes = [
        {"name": "PMQ+ 2.0", "quant": {"method": "pmq+", "target_bits": 2.0, "group_size": 16,
                                       "plus": {"max_candidates": 3}}},
        {"name": "PMQ global 2.0", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 16, "scope": "global"}},
    ]
    summary = run_suite(load_suite(write_suite(tmp_path, recipes)), progress=False, command="mcmoe-vl run")
    assert summary.failed == []
    by_name = {load_results(p).recipe: load_results(p) for p in summary.results}
    assert by_name["PMQ+ 2.0"].compression.quant.allocator == "pmq+"
    assert 1.0 < by_name["PMQ+ 2.0"].compression.nominal_bits < 4.0
    plans = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("plan.json")]
    plus = [p for p in plans if p["allocator"] == "pmq+"]
    assert len(plus) == 1 and len(plus[0]["selection"]["candidates"]) == 3 and plus[0]["refit_1bit"]
    stats = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("stats_gptq.json")]
    assert len(stats) == 1 and stats[0]["config"]["quantizer"] == "gptq"
    glob = [p for p in plans if p["settings"].get("scope") == "global" and p["allocator"] == "pmq"]
    assert len(glob) == 1
    md = summary.report.read_text()
    assert "pmq+ chose the " in md and "one global budget over all layers" in md
