"""The DeepSeek-VL2 port loads its compressed directories through its own from_pretrained, strictly and
bit-exactly, with the directory's pruning settings applied (or not)."""

import json
import shutil

import pytest
import torch

from mcmoe_vl.data.embedded import VLM_TINY_DIR, load_embedded_vlm
from mcmoe_vl.quant.checkpoint import MANIFEST_FILE, CheckpointError, save_quantized
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.plan import BitPlan
from model_adapters import get_adapter
from model_adapters.deepseek_vl2.loading import from_pretrained


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    model, _ = load_embedded_vlm(dtype=torch.bfloat16)
    layers = {la.index: la.num_experts for la in get_adapter(model).moe_layers(model)}
    plan = BitPlan.from_experts({i: [2, 3, 1, 2, 2, 3, 2, 1][:n] for i, n in layers.items()},
                                model_type="deepseek_vl_v2")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 200, (1, 48), generator=g)} for _ in range(2)]
    report = quantize_model(model, plan, batches, QuantizeConfig(progress=False, min_tokens=1),
                            adapter=get_adapter(model))
    out = tmp_path_factory.mktemp("vl2") / "q"
    save_quantized(model, out, plan=plan, report=report, adapter=get_adapter(model))
    return model, out


def test_compressed_directory_loads_bit_exactly(quantized):
    model, out = quantized
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mcmoe_vl"
    assert "language_config" in cfg and "vision_config" in cfg  # the official layout, as the port reads it
    assert (out / "tokenizer.json").read_bytes() == (VLM_TINY_DIR / "tokenizer.json").read_bytes()
    loaded = from_pretrained(out)
    assert sum(type(m).__name__ == "QuantLinear" for m in loaded.modules()) > 0
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    a = _logits(model, ids)
    assert a.abs().sum() > 0 and torch.equal(_logits(loaded, ids), a)
    original = from_pretrained(VLM_TINY_DIR, dtype=torch.bfloat16)  # the official checkpoint, same entry point
    assert not torch.equal(_logits(original, ids), a)


def test_edited_config_or_manifest_is_refused(quantized, tmp_path):
    _, out = quantized
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["language_config"]["rms_norm_eps"] = 0.5
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rms_norm_eps"):
        from_pretrained(bad)
    shutil.copy(out / "config.json", bad / "config.json")
    man = json.loads((bad / MANIFEST_FILE).read_text())
    man["plan"]["other_bits"] = 3
    (bad / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="edited after it was written"):
        from_pretrained(bad)


def test_pruning_settings_are_applied_on_load(quantized, tmp_path):
    from mcmoe_vl.pruning.artifact import odp_artifact, save_pruning
    from mcmoe_vl.pruning.odp import ODPThresholds
    from model_adapters import expert_interface

    model, out = quantized
    d = tmp_path / "pruned"
    shutil.copytree(out, d)
    layers = [la.index for la in get_adapter(model).moe_layers(model)]
    art = odp_artifact(expert_interface(model), ODPThresholds(mu={i: 0.7 for i in layers}, protect_ratio=0.0))
    save_pruning(art, d / "pruning.json")
    ids = torch.randint(0, 200, (1, 32), generator=torch.Generator().manual_seed(4))
    pruned, dense = from_pretrained(d), from_pretrained(d, apply_pruning=False)
    assert pruned.mcmoe_pruning is not None and dense.mcmoe_pruning is None
    assert torch.equal(_logits(dense, ids), _logits(model, ids))
    assert not torch.equal(_logits(pruned, ids), _logits(dense, ids))
