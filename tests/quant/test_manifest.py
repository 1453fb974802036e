"""The typed checkpoint manifest: validated field by field on read, and manifests already on disk still load.

``tests/data/legacy/checkpoint_v2`` is a tiny Mixtral checkpoint (one MoE layer, experts at 2, 3, 1 and 16 bits,
group 32, ``o_proj`` kept 16-bit by a ``re:`` override) written before the manifest was typed and before the plan
types became one: its manifest holds the engine's former plan form. ``checkpoint_v2_logits.safetensors`` holds its
logits for fixed token ids, computed when it was written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcmoe_vl.quant.checkpoint import (MANIFEST_FILE, CheckpointError, Manifest, load_quantized, read_manifest,
                                      seal_manifest)
from mcmoe_vl.quant.qlinear import QuantExperts, QuantLinear, Runtime
from model_adapters import get_adapter

LEGACY = Path(__file__).resolve().parent.parent / "data" / "legacy"
OLD = LEGACY / "checkpoint_v2"


def _expected() -> tuple[torch.Tensor, torch.Tensor]:
    ref = load_file(str(LEGACY / "checkpoint_v2_logits.safetensors"))
    return ref["input_ids"], ref["logits"]


def test_a_manifest_written_before_it_was_typed_reads_into_the_types():
    raw = json.loads((OLD / MANIFEST_FILE).read_text())
    assert raw["plan"]["format"] == "mcmoe_vl.quant_plan"  # the fixture holds the former plan form
    man = read_manifest(OLD)
    assert isinstance(man, Manifest) and man.model_type == "mixtral" and man.dtype == "bfloat16"
    assert man.plan.experts == {0: [2, 3, 1, 16]} and man.plan.group_size == 32
    assert man.plan.module_bits("model.layers.0.self_attn.o_proj") == 16
    assert [e.kind for e in man.experts["model.layers.0.mlp.experts"].experts] == ["quant"] * 3 + ["dense"]
    assert man.quantized["model.layers.0.self_attn.q_proj"].bits == 4
    assert man.file.bytes == (OLD / "model.safetensors").stat().st_size
    assert man.accounting.bytes_on_disk == man.file.bytes and man.quantize_config.min_tokens == 1


@pytest.mark.parametrize("runtime", [Runtime.FAKE, Runtime.PACKED])
def test_a_checkpoint_written_before_the_manifest_was_typed_loads_with_its_logits(runtime):
    ids, want = _expected()
    model = load_quantized(OLD, runtime=runtime)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        got = model(ids).logits.float()
    assert got.abs().sum() > 0 and torch.equal(got, want)


def test_a_loaded_old_checkpoint_saves_again_in_the_current_form(tmp_path):
    ids, want = _expected()
    with pytest.raises(CheckpointError, match="without its family's adapter"):  # saving needs the family's modules
        load_quantized(OLD).save_pretrained(tmp_path / "refused")
    model = load_quantized(OLD, adapter=get_adapter("mixtral"))
    model.save_pretrained(tmp_path / "again")
    raw = json.loads((tmp_path / "again" / MANIFEST_FILE).read_text())
    assert raw["plan"]["format_version"] == 2 and raw["plan"]["layers"][0]["bits"] == [2, 3, 1, 16]
    man = read_manifest(tmp_path / "again")
    assert man.plan == read_manifest(OLD).plan and man.to_json() == raw
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "again")(ids).logits.float(), want)


def _sealed(tmp_path: Path, edit) -> Path:
    """A copy of the old checkpoint whose manifest is edited and sealed again (a consistent but wrong manifest)."""
    bad = tmp_path / "bad"
    shutil.copytree(OLD, bad)
    man = json.loads((bad / MANIFEST_FILE).read_text())
    edit(man)
    (bad / MANIFEST_FILE).write_text(json.dumps(seal_manifest(man)))
    return bad


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(bogus=1), r"bogus: unknown key \(valid: format, format_version, model_type"),
    (lambda m: m["quantized"]["model.layers.0.self_attn.q_proj"].update(bits="four"),
     r"quantized\.model\.layers\.0\.self_attn\.q_proj\.bits: Input should be a valid integer"),
    (lambda m: m["quantized"]["model.layers.0.self_attn.q_proj"].update(bitz=4),
     r"q_proj\.bitz: unknown key \(valid: bits, shape, group_size, perm, bias, dtype\)"),
    (lambda m: m["experts"]["model.layers.0.mlp.experts"]["experts"][0].update(kind="half"),
     r"experts\.model\.layers\.0\.mlp\.experts\.experts\.0\.kind: Input should be 'quant' or 'dense'"),
    (lambda m: m["tensors"]["lm_head.weight"].pop("shape"), r"tensors\.lm_head\.weight\.shape: required key"),
    (lambda m: m["plan"]["experts"]["0"].__setitem__(0, 5), r"plan.*width 5 is not supported; valid widths"),
    (lambda m: m.pop("quantize_config"), "quantize_config: required key is missing"),
])
def test_a_bad_manifest_field_is_named_with_what_is_valid(tmp_path, edit, match):
    bad = _sealed(tmp_path, edit)
    with pytest.raises(CheckpointError, match="invalid manifest: .*" + match):
        read_manifest(bad)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(bad)


def test_format_version_and_integrity_are_checked(tmp_path):
    bad = _sealed(tmp_path, lambda m: m.update(format_version=3))
    with pytest.raises(CheckpointError, match="format version 3 is not supported"):
        read_manifest(bad)
    bad = _sealed(tmp_path / "2", lambda m: None)
    man = json.loads((bad / MANIFEST_FILE).read_text())
    del man["integrity"]
    (bad / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="edited after it was written"):
        read_manifest(bad)
