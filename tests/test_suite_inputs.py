"""Each stage's typed inputs are both hashed for its cache key and passed to it (mcmoe_vl.suite.inputs)."""

from __future__ import annotations

from types import SimpleNamespace

from mcmoe_vl.suite.cache import stage_key
from mcmoe_vl.suite.inputs import RecipeInputs
from mcmoe_vl.suite.schema import RecipeSpec, Suite

SUITE = {
    "name": "s",
    "models": [{"name": "m", "checkpoint": "ckpt", "adapter": "mixtral"}],
    "recipes": [{"name": "16-bit"}],
    "tasks": [{"harness": "lm_eval", "name": "t", "limit": 4}],
    "calibration": {"data": "calib.txt", "num_sequences": 4, "seq_len": 32},
}


def _inputs(suite: Suite, recipe: dict, seed: int = 0) -> RecipeInputs:
    ctx = SimpleNamespace(fingerprint={"files": {"model.safetensors": "abc"}}, spec=suite.models[0],
                          calibration_source=suite.calibration.data, seed=seed)
    return RecipeInputs.build(suite, ctx, RecipeSpec(**recipe), version="1", software={"torch": "2"},
                              checkpoint_format=2)


def test_keys_hash_exactly_what_each_stage_receives():
    suite = Suite(**SUITE)
    plan = _inputs(suite, {"name": "Q", "quant": {"method": "pmq", "target_bits": 2.0},
                           "prune": {"method": "odp", "prune_rate": 0.1}})
    for name, inp in (("calibrate", plan.calibrate), ("allocate", plan.allocate), ("quantize", plan.quantize),
                      ("prune", plan.prune), ("evaluate", plan.evaluate)):
        assert inp is not None and inp.key == stage_key(name, inp.hashed()) == plan.keys()[name]
    # the stages read their settings from these objects; upstream inputs are held whole and hashed as their keys
    assert plan.quantize.allocate is plan.allocate and plan.allocate.calibrate is plan.calibrate
    assert plan.quantize.hashed()["calibrate"] == plan.calibrate.key
    assert plan.prune.hashed()["base"] == plan.quantize.key
    assert plan.evaluate.hashed()["prune"] == plan.prune.key


def test_a_setting_changes_the_keys_of_the_stages_that_read_it_and_no_others():
    base = _inputs(Suite(**SUITE), {"name": "Q", "quant": {"method": "pmq", "target_bits": 2.0}}).keys()
    gptq = _inputs(Suite(**SUITE), {"name": "Q", "quant": {"method": "pmq", "target_bits": 2.0,
                                                            "gptq": {"damp": 0.02}}}).keys()
    assert gptq["calibrate"] == base["calibrate"] and gptq["allocate"] == base["allocate"]  # the plan is reused
    assert gptq["quantize"] != base["quantize"] and gptq["evaluate"] != base["evaluate"]
    # min_tokens is a calibration setting the quantize stage reads through its inputs: it reaches its key
    other = Suite(**{**SUITE, "calibration": {**SUITE["calibration"], "min_tokens": 3}})
    changed = _inputs(other, {"name": "Q", "quant": {"method": "pmq", "target_bits": 2.0}}).keys()
    assert all(changed[k] != base[k] for k in ("calibrate", "allocate", "quantize", "evaluate"))
    seed1 = _inputs(Suite(**SUITE), {"name": "Q", "quant": {"method": "pmq", "target_bits": 2.0}}, seed=1).keys()
    assert all(seed1[k] != base[k] for k in ("calibrate", "allocate", "quantize", "evaluate"))


def test_the_baseline_runs_only_the_evaluate_stage():
    plan = _inputs(Suite(**SUITE), {"name": "16-bit"})
    assert plan.keys()["evaluate"] is not None
    assert [k for k, v in plan.keys().items() if v is None] == ["calibrate", "allocate", "quantize", "prune"]
    assert "runtime" not in plan.evaluate.hashed()["evaluation"]  # the 16-bit model has no quantized runtime
