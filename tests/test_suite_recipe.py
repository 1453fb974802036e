"""A suite recipe's quant and prune are the library's own configs, passed to the stages unchanged
(mcmoe_vl.suite.recipe)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.allocation.plus import PlusConfig
from mcmoe_vl.pruning.method import PruningMethod
from mcmoe_vl.pruning.odp import ODPConfig
from mcmoe_vl.pruning.otp import OTPConfig
from mcmoe_vl.quant.model import QuantizeConfig
from mcmoe_vl.suite import stages
from mcmoe_vl.suite.inputs import RecipeInputs
from mcmoe_vl.suite.load import SuiteError, parse_suite_text
from mcmoe_vl.suite.schema import QuantRecipe, RecipeSpec, Suite

SUITE = {
    "name": "s",
    "models": [{"name": "m", "checkpoint": "ckpt", "adapter": "mixtral"}],
    "recipes": [{"name": "16-bit"}],
    "tasks": [{"harness": "lm_eval", "name": "t", "limit": 4}],
    "calibration": {"data": "calib.txt", "num_sequences": 4, "seq_len": 32, "min_tokens": 5},
}


def _suite(*recipes: dict) -> Suite:
    return Suite(**{**SUITE, "recipes": [{"name": "16-bit"}, *recipes]})


def _error(**recipe) -> str:
    with pytest.raises(ValidationError) as ei:
        RecipeSpec(name="r", **recipe)
    return str(ei.value)


def test_quant_and_prune_are_the_library_configs():
    s = _suite({"name": "Q", "quant": {"method": "pmq", "target_bits": 2.5, "bits": [2, 3, 4], "scope": "global",
                                       "gptq": {"act_order": True}},
                "prune": {"method": "odp", "prune_rate": 0.15}},
               {"name": "P", "quant": {"method": "pmq+", "target_bits": 2.0, "plus": {"max_candidates": 3}},
                "prune": {"method": "otp", "steps": 7}})
    q, p = s.recipes[1].quant, s.recipes[1].prune
    assert type(q.allocation) is AllocationConfig and type(q.gptq) is QuantizeConfig and q.plus is None
    assert q.allocation == AllocationConfig(method="pmq", target_bits=2.5, bits=(2, 3, 4), scope="global")
    assert q.gptq == QuantizeConfig(act_order=True, min_tokens=5)  # min_tokens: the calibration table's
    assert type(p) is ODPConfig and p == ODPConfig(prune_rate=0.15)
    q2, p2 = s.recipes[2].quant, s.recipes[2].prune
    assert type(q2.plus) is PlusConfig and q2.plus == PlusConfig(max_candidates=3, min_tokens=5)
    assert type(p2) is OTPConfig and p2 == OTPConfig(steps=7) and p2.method is PruningMethod.OTP


def test_recipe_defaults():
    q = QuantRecipe.model_validate({"method": "uniform", "target_bits": 3})
    assert q.allocation.bits == (3,) and q.allocation.require_widths == ()  # uniform n-bit: the one width n
    q = QuantRecipe.model_validate({"method": "pmq", "target_bits": 2.0})
    assert q.allocation.bits == (1, 2, 3) and q.allocation.required == (2, 3)  # the paper's constraint
    assert QuantRecipe.model_validate({"method": "pmq+", "target_bits": 2.0}).plus == PlusConfig()
    # a min_tokens the recipe gives is kept
    s = _suite({"name": "Q", "quant": {"method": "pmq+", "target_bits": 2.0, "gptq": {"min_tokens": 9},
                                       "plus": {"min_tokens": 8}}})
    assert (s.recipes[1].quant.gptq.min_tokens, s.recipes[1].quant.plus.min_tokens) == (9, 8)
    # the nested form (a resolved recipe) reads back as the same recipe
    assert QuantRecipe.model_validate(q.model_dump(mode="json")) == q


def test_the_stages_receive_the_recipe_objects(monkeypatch):
    s = _suite({"name": "Q", "quant": {"method": "pmq", "target_bits": 2.0, "gptq": {"damp": 0.05}},
                "prune": {"method": "otp", "steps": 3}})
    r = s.recipes[1]
    ctx = SimpleNamespace(fingerprint={"files": {}}, spec=s.models[0], calibration_source="calib.txt", seed=4)
    inp = RecipeInputs.build(s, ctx, r, version="1", software={}, checkpoint_format=2)
    assert inp.allocate.allocation == r.quant.allocation.model_copy(update={"seed": 4})  # the run's seed
    assert inp.quantize.gptq is r.quant.gptq
    assert inp.prune.prune == r.prune.model_copy(update={"seed": 4})
    seen = {}

    def capture(stats, config):
        seen["config"] = config
        raise RuntimeError("captured")

    monkeypatch.setattr("mcmoe_vl.allocation.allocate.allocate", capture)
    with pytest.raises(RuntimeError, match="captured"):
        stages.allocate(None, inp.allocate.allocation, inp.allocate.plus, plan_path=Path("p.json"),
                        heatmap_path=Path("h.png"), title="t")
    assert seen["config"] is inp.allocate.allocation


@pytest.mark.parametrize(("recipe", "needle"), [
    ({"quant": {"allocator": "pmq", "bits": 2.0}},
     "unknown quant keys ['allocator'] ('allocator' is now 'method'; the average 'bits' is now 'target_bits')"),
    ({"quant": {"method": "pmq", "target_bits": 2.0, "bit_set": [1, 2]}}, "'bit_set' is now 'bits'"),
    ({"quant": {"method": "pmq", "target_bits": 2.0, "bitz": [1, 2]}},
     "unknown quant keys ['bitz']; valid: method, target_bits, budget, bits,"),
    ({"quant": {"method": "pmq", "bits": 2.0}}, "quant.bits is the set of widths"),
    ({"quant": {"method": "pmq"}}, "quant.target_bits is required"),
    ({"quant": {"method": "pmq", "target_bits": 2.0, "bits": [1, 5]}}, "bits[1]: width 5 is not supported"),
    ({"quant": {"method": "pmq", "target_bits": 2.0, "other_bits": 8}}, "other_bits: width 8 is not supported"),
    ({"quant": {"method": "uniform", "target_bits": 2.5}}, "whole number of target_bits"),
    ({"quant": {"method": "pmq", "target_bits": 2.0, "plus": {}}}, "quant.plus is for method 'pmq+'"),
    ({"quant": {"method": "pmq", "target_bits": 2.0, "gptq": {"damp": -1}}}, "quant.gptq.damp"),
    ({"quant": {"method": "pmq", "target_bits": 2.0, "gptq": {"dmap": 1}}}, "quant.gptq.dmap"),
    ({"quant": {"method": "random", "target_bits": 2.0, "seed": 3}}, "quant.seed is not a recipe setting"),
    ({"prune": {"method": "xdp"}}, "prune.method 'xdp' is not a pruning method; valid: odp, otp"),
    ({"prune": {"prune_rate": 0.1}}, "prune.method is required; valid: odp, otp"),
    ({"prune": {"method": "otp", "mu": 0.5}}, "prune.otp.mu"),
    ({"prune": {"method": "odp", "steps": 3}}, "prune.odp.steps"),
    ({"prune": {"method": "odp", "mu": 0.5, "prune_rate": 0.1}}, "either a fixed mu or a prune_rate"),
    ({"prune": {"method": "otp", "seed": 2}}, "prune.seed is not a recipe setting"),
])
def test_bad_recipes_name_the_key(recipe, needle):
    assert needle in _error(**recipe)


@pytest.mark.parametrize(("prune", "needle"), [
    ('{ method = "odp", stpes = 3 }',
     "recipes.0.prune.odp.stpes: unknown key; valid: method, mu, prune_rate, quantile, layers, protect_ratio"),
    ('{ method = "otp", mu = 0.5 }', "recipes.0.prune.otp.mu: unknown key; valid: method, width, prune_rate, lam"),
])
def test_suite_file_errors_list_the_valid_keys(prune, needle):
    text = "\n".join([
        'name = "s"', '[[models]]', 'name = "m"', 'checkpoint = "c"', 'adapter = "mixtral"',
        '[[tasks]]', 'harness = "lm_eval"', 'name = "t"',
        '[[recipes]]', 'name = "R"', f'prune = {prune}'])
    with pytest.raises(SuiteError) as ei:
        parse_suite_text(text, fmt="toml")
    assert needle in str(ei.value)
