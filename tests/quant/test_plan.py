"""One plan type from the allocator to the quantizer: the JSON form, and the two older plan files still read.

``tests/data/legacy/bit_plan_v1.json`` is a plan the allocator wrote (``pmq``, the tiny suite's embedded Mixtral)
before the two plan types became one; ``quant_plan_v1.json`` a plan in the engine's former hand-written form.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mcmoe_vl.quant.plan import PLAN_FORMAT_VERSION, BitPlan, LayerPlan, PlanError, load_plan, plan_from_dict

LEGACY = Path(__file__).resolve().parent.parent / "data" / "legacy"


def test_the_allocators_version_1_plan_file_loads_unchanged_in_meaning(tmp_path):
    raw = json.loads((LEGACY / "bit_plan_v1.json").read_text())
    assert raw["format_version"] == 1 and "group_size" not in raw  # the fixture is the old form
    plan = load_plan(LEGACY / "bit_plan_v1.json")
    assert plan.experts == {la["index"]: la["bits"] for la in raw["layers"]}
    assert [la.path for la in plan.layers] == [la["path"] for la in raw["layers"]]
    assert plan.group_size == raw["settings"]["group_size"] == 128  # the old form kept it in the settings
    assert (plan.allocator, plan.target, plan.achieved) == (raw["allocator"], raw["target"], raw["achieved"])
    assert plan.source == raw["source"] and plan.source["model_fingerprint"]
    assert (plan.other_bits, plan.shared_experts_bits, plan.refit_1bit) == (4, 4, False)
    plan.save(tmp_path / "plan.json")  # written again in this version's form, and read back equal
    assert json.loads((tmp_path / "plan.json").read_text())["format_version"] == PLAN_FORMAT_VERSION
    assert load_plan(tmp_path / "plan.json") == plan


def test_the_engines_former_hand_written_plan_file_loads(tmp_path):
    raw = json.loads((LEGACY / "quant_plan_v1.json").read_text())
    assert raw["format"] == "mcmoe_vl.quant_plan" and raw["version"] == 1
    plan = load_plan(LEGACY / "quant_plan_v1.json")
    assert plan.experts == {0: [2, 3, 1, 16]} and plan.model_type == "mixtral"
    assert plan.group_size == 32 and plan.other_bits == raw["default_bits"] == 4
    assert plan.allocator == "hand" and plan.metadata == {"note": "legacy fixture"}  # the rest stays metadata
    assert plan.module_bits("model.layers.0.self_attn.o_proj") == 16  # the regex override
    assert plan.module_bits("model.layers.0.self_attn.q_proj") == 4
    assert plan.module_bits("lm_head") == 16  # keep_16bit
    plan.save(tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan


def test_former_engine_plan_facts_land_in_their_fields():
    plan = plan_from_dict({"format": "mcmoe_vl.quant_plan", "version": 1, "experts": {"3": [1, 2]},
                           "metadata": {"allocator": "pmq", "refit_1bit": True, "starved": {"3": [1]},
                                        "source": {"model_fingerprint": {"files": {}}}, "target": {"bits": 1.5}}})
    assert plan.allocator == "pmq" and plan.refit_1bit and plan.layer(3).starved == [1]
    assert plan.source == {"model_fingerprint": {"files": {}}} and plan.target == {"bits": 1.5}
    assert plan.metadata == {}


def test_a_hand_written_plan_needs_only_its_layers():
    plan = plan_from_dict({"layers": [{"index": 0, "bits": [2, 3]}, {"index": 1, "bits": [4, 16]}]})
    assert plan == BitPlan.from_experts({0: [2, 3], 1: [4, 16]}) == BitPlan(
        layers=[LayerPlan(index=0, bits=[2, 3]), LayerPlan(index=1, bits=[4, 16])])
    assert plan.expert_bits(1, 2) == [4, 16] and plan.allocator == "hand" and plan.group_size == 128


@pytest.mark.parametrize("data, match", [
    ([1, 2], "a plan must be a JSON object"),
    ({"format_version": 7, "layers": []}, "format_version 7"),
    ({"format": "mcmoe_vl.quant_plan", "version": 2, "experts": {}}, "only version 1"),
    ({"layers": [{"index": 0, "bits": [2, 5]}]}, r"layer 0: bits\[1\]: width 5 is not supported; valid widths"),
    ({"layers": [{"index": 0, "bits": [2]}, {"index": 0, "bits": [2]}]}, "a layer appears twice"),
    ({"layers": [{"index": 0, "bits": []}]}, "bits is empty"),
    ({"layers": [{"index": 0, "bits": [2]}], "modules": {"re:(": 2}}, "invalid regular expression"),
    ({"layers": [{"index": 0, "bits": [2]}], "other_bit": 2}, "other_bit"),
    ({"format_version": 1, "layers": [{"index": 0, "bits": [2]}], "group_size": 64}, "group_size"),
])
def test_bad_plans_are_named(data, match):
    with pytest.raises(PlanError, match=match):
        plan_from_dict(data, source="p.json")


def test_the_plan_checks_the_models_layers():
    plan = BitPlan.uniform({0: 4, 2: 4}, 2)
    plan.check_layers({0: 4, 2: 4})
    with pytest.raises(PlanError, match=r"layers \[2\], which have no MoE block"):
        plan.check_layers({0: 4})
    with pytest.raises(PlanError, match="no widths for MoE layer 1"):
        plan.check_layers({0: 4, 1: 4, 2: 4})
    with pytest.raises(PlanError, match="gives 4 widths but the model has 8"):
        plan.expert_bits(0, 8)


def test_the_quantizer_does_not_import_the_allocator():
    """Dependencies point one way: allocation imports the plan from quant, never the reverse."""
    code = ("import sys, mcmoe_vl.quant.plan, mcmoe_vl.quant.model, mcmoe_vl.quant.checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('mcmoe_vl.allocation')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
