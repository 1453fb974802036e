"""mcmoe_vl.compress: one call, any data form, either plan type; bad arguments refused before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mcmoe_vl
from mcmoe_vl.quant.plan import PlanError, QuantPlan, as_quant_plan

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
    with pytest.raises(PlanError, match="QuantPlan, the allocator's BitPlan"):
        mcmoe_vl.compress(EMBEDDED, _ids(), plan=42)
    with pytest.raises(ValueError, match="integer"):
        mcmoe_vl.compress(EMBEDDED, torch.rand(2, 8))
    with pytest.raises(ValueError, match="list of strings"):
        mcmoe_vl.compress(EMBEDDED, [object()])


def test_token_ids_in_bit_plan_out_and_its_plan_reused(tmp_path):
    cm = mcmoe_vl.compress(str(EMBEDDED), _ids().tolist(), target_bits=2.0, num_sequences=3)
    assert type(cm.bit_plan).__name__ == "BitPlan"
    assert cm.plan.experts == {lp.index: lp.bits for lp in cm.bit_plan.layers}
    assert cm.stats.num_sequences == 3
    acc = cm.accounting
    assert acc.bytes_on_disk is None and 1.5 < acc.summary()["effective_bits_experts"] < 3.0
    saved = cm.save(tmp_path / "q")
    assert saved.bytes_on_disk == (tmp_path / "q" / "model.safetensors").stat().st_size
    # the allocator's BitPlan goes straight back in: no conversion by hand
    again = mcmoe_vl.compress(str(EMBEDDED), _ids(), plan=cm.bit_plan)
    assert again.stats is None and again.plan.experts == cm.plan.experts
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


def test_every_plan_taking_function_accepts_both_plan_types(tmp_path):
    from tiny import batches, tiny_mixtral_q

    from mcmoe_vl.allocation.plan import BitPlan, LayerPlan
    from mcmoe_vl.quant.checkpoint import read_manifest, save_quantized
    from mcmoe_vl.quant.model import QuantizeConfig, quantize_model

    bp = BitPlan(model_type="mixtral", allocator="hand", settings={}, target={"bits": 2.0}, achieved={},
                 layers=[LayerPlan(index=i, path=f"model.layers.{i}.mlp", bits=[2, 3, 1, 2], nominal=2.0,
                                   effective=2.25, starved=[]) for i in range(2)],
                 shared_experts_bits=4, other_bits=4)
    qp = as_quant_plan(bp)
    assert isinstance(qp, QuantPlan) and as_quant_plan(qp) is qp
    assert as_quant_plan(qp.model_dump(mode="json")).experts == qp.experts
    model = tiny_mixtral_q(dtype=torch.bfloat16)
    report = quantize_model(model, bp, batches(1), QuantizeConfig(progress=False, min_tokens=0))
    save_quantized(model, tmp_path / "q", plan=bp, report=report)
    assert read_manifest(tmp_path / "q")["plan"]["experts"]["1"] == [2, 3, 1, 2]
    with pytest.raises(PlanError, match="pass|QuantPlan"):
        quantize_model(tiny_mixtral_q(), ["not", "a", "plan"], batches(1))


def test_pmq_plus_by_name_with_a_held_apart_selection_split():
    pytest.importorskip("mcmoe_vl.allocation.plus", reason="the pmq+ allocator is merged separately")
    cm = mcmoe_vl.compress(EMBEDDED, _ids(4, 64), allocator="pmq+", target_bits=2.0, num_sequences=4)
    assert cm.bit_plan.allocator == "pmq+" and cm.bit_plan.selection["chosen"]
    assert cm.stats.num_sequences == 3  # the fourth sequence was held apart for the selection
