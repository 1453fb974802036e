"""mcmoe_vl.compress: one call, any data form, either plan type; bad arguments refused before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mcmoe_vl
from mcmoe_vl.quant.plan import BitPlan, PlanError
from model_adapters import get_adapter

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "embedded" / "mixtral-tiny"
sys.path.insert(0, str(Path(__file__).parent / "quant"))


def _ids(n=3, seq=64, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _fail_on_load(monkeypatch):
    import mcmoe_vl.calibration.workflow as wf

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(wf, "load_model", boom)


def test_bad_arguments_fail_before_the_model_is_loaded(monkeypatch):
    from mcmoe_vl.registry import RegistryError

    _fail_on_load(monkeypatch)
    with pytest.raises(RegistryError, match="pmq"):
        mcmoe_vl.compress(EMBEDDED, _ids(), allocator="pmqq")
    with pytest.raises(ValueError, match="prune="):
        mcmoe_vl.compress(EMBEDDED, _ids(), prune="magic")
    with pytest.raises(PlanError, match="a plan must be a BitPlan"):
        mcmoe_vl.compress(EMBEDDED, _ids(), plan=42)
    with pytest.raises(ValueError, match="integer"):
        mcmoe_vl.compress(EMBEDDED, torch.rand(2, 8))
    with pytest.raises(ValueError, match="list of strings"):
        mcmoe_vl.compress(EMBEDDED, [object()])


def test_token_ids_in_bit_plan_out_and_its_plan_reused(tmp_path):
    cm = mcmoe_vl.compress(str(EMBEDDED), _ids().tolist(), target_bits=2.0, num_sequences=3)
    assert isinstance(cm.plan, BitPlan) and cm.plan.allocator == "pmq" and cm.plan.target["bits"] == 2.0
    assert cm.stats.num_sequences == 3
    acc = cm.accounting
    assert acc.bytes_on_disk is None and 1.5 < acc.summary()["effective_bits_experts"] < 3.0
    saved = cm.save(tmp_path / "q")
    assert saved.bytes_on_disk == (tmp_path / "q" / "model.safetensors").stat().st_size
    # the allocator's plan goes straight back in, as it is
    again = mcmoe_vl.compress(str(EMBEDDED), _ids(), plan=cm.plan)
    assert again.stats is None and again.plan is cm.plan
    ids = _ids(1, 40, seed=9)
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, cm.model(ids).logits)


def test_strings_and_odp_pruning_travel_with_the_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    texts = ["def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n" * 6] * 3
    cm = mcmoe_vl.compress(EMBEDDED, texts, target_bits=2.5, num_sequences=2, seq_len=96, prune="odp")
    assert cm.pruning is not None and cm.pruning.method.value == "odp"
    cm.save(tmp_path / "q")
    assert (tmp_path / "q" / "pruning.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    ids = _ids(1, 48, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, cm.model(ids).logits)  # pruned in memory and on load alike
    from mcmoe_vl.hf import loading_options

    with loading_options(apply_pruning=False):
        dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    with torch.no_grad():
        assert not torch.equal(dense(ids).logits, cm.model(ids).logits)  # the pruning really drops experts


def test_every_plan_taking_function_takes_the_plan_as_it_is(tmp_path):
    from tiny import batches, tiny_mixtral_q

    from mcmoe_vl.api import _given_plan
    from mcmoe_vl.quant.checkpoint import read_manifest, save_quantized
    from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
    from mcmoe_vl.quant.plan import LayerPlan

    bp = BitPlan(model_type="mixtral", allocator="hand", settings={}, target={"bits": 2.0}, achieved={},
                 layers=[LayerPlan(index=i, path=f"model.layers.{i}.mlp", bits=[2, 3, 1, 2], nominal=2.0,
                                   effective=2.25, starved=[]) for i in range(2)],
                 shared_experts_bits=4, other_bits=4)
    assert _given_plan(bp) is bp and _given_plan(bp.model_dump(mode="json")) == bp
    bp.save(tmp_path / "plan.json")
    assert _given_plan(str(tmp_path / "plan.json")) == bp
    model = tiny_mixtral_q(dtype=torch.bfloat16)
    report = quantize_model(model, bp, batches(1), QuantizeConfig(progress=False, min_tokens=0),
                            adapter=get_adapter(model))
    save_quantized(model, tmp_path / "q", plan=bp, report=report, adapter=get_adapter(model))
    assert read_manifest(tmp_path / "q").plan == bp  # the plan travels with the checkpoint unchanged
    with pytest.raises(PlanError, match="a plan must be a BitPlan"):
        quantize_model(tiny_mixtral_q(), ["not", "a", "plan"], batches(1), adapter=get_adapter(tiny_mixtral_q()))


def test_pmq_plus_by_name_with_a_held_apart_selection_split():
    pytest.importorskip("mcmoe_vl.allocation.plus", reason="the pmq+ allocator is merged separately")
    cm = mcmoe_vl.compress(EMBEDDED, _ids(4, 64), allocator="pmq+", target_bits=2.0, num_sequences=4)
    assert cm.plan.allocator == "pmq+" and cm.plan.selection["chosen"]
    assert cm.stats.num_sequences == 3  # the fourth sequence was held apart for the selection
