"""DeepSeek-VL2 port: faithfulness to the official code's outputs, strict loading, official-layout saving, config
checks."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_adapters.deepseek_vl2 import (
    DeepseekVL2ForCausalLM,
    load_official,
    model_from_config,
    parse_official_config,
    save_official,
)
from model_adapters.deepseek_vl2.loading import official_layout



DATA = Path(__file__).parent / "data" / "deepseek_vl2_reference"
CKPT = DATA / "tiny_like"


def _official_config() -> dict:
    return json.loads((CKPT / "config.json").read_text())


@pytest.fixture(scope="module")
def inputs():
    return load_file(str(DATA / "inputs.safetensors"))


@pytest.fixture(scope="module")
def reference():
    return load_file(str(CKPT / "reference_outputs.safetensors"))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_official_outputs(attn, inputs, reference):
    model = load_official(CKPT, attn_implementation=attn)
    assert type(model.language).__name__ == "DeepseekVL2MHAV2ForCausalLM"  # tiny: multi-head attention
    n_img = json.loads((DATA / "inputs.json").read_text())["n_img_tok"]
    assert int(inputs["seq_mask"].sum()) == n_img
    with torch.no_grad():
        vision = model.vision_features(inputs["images"][0])
        proj = model.projector(vision)
        logits = model(
            input_ids=inputs["ids"],
            images=inputs["images"],
            images_seq_mask=inputs["seq_mask"],
            images_spatial_crop=inputs["spatial"],
        ).logits
        text_only = model(input_ids=inputs["ids"]).logits
    for name, out in (("vision", vision), ("projector", proj), ("logits", logits)):
        ref = reference[name]
        assert out.shape == ref.shape, name
        assert ref.abs().mean() > 1e-2  # not vacuous
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=name)
    # The images matter: the same ids without images give other logits.
    assert (text_only - reference["logits"]).abs().max() > 1e-2


def test_save_official_round_trip(tmp_path):
    model = load_official(CKPT)
    out = save_official(model, tmp_path / "ckpt")
    original = load_file(str(CKPT / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(original)
    for k, v in original.items():
        assert torch.equal(written[k], v), k
    assert json.loads((out / "config.json").read_text()) == _official_config()
    again = load_official(out)
    for (a, x), (b, y) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert a == b and torch.equal(x, y), a


def test_random_model_from_config_saves_and_loads(tmp_path):
    cfg = _official_config()
    model = model_from_config(cfg, seed=3)
    assert isinstance(model, DeepseekVL2ForCausalLM)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.dim() >= 2:
            assert p.std() > 0, name  # initialised
    save_official(model, tmp_path)
    loaded = load_official(tmp_path)
    ids = torch.tensor([[0, 17, 33, 44]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_layout_covers_every_tensor_once():
    model = model_from_config(_official_config(), seed=0)
    layout = official_layout(model)
    original = load_file(str(CKPT / "model.safetensors"))
    assert set(layout) == set(original)
    assert all(layout[k].shape == tuple(v.shape) for k, v in original.items())


def _copy_ckpt(tmp_path: Path, edit) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(CKPT, dst)
    (dst / "reference_outputs.safetensors").unlink()
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_key_is_an_error_naming_it(tmp_path):
    key = "language.model.layers.1.mlp.experts.5.up_proj.weight"
    path = _copy_ckpt(tmp_path, lambda t: t.pop(key))
    with pytest.raises(KeyError, match=r"missing 1 \['language\.model\.layers\.1\.mlp\.experts\.5\.up_proj"):
        load_official(path)


def test_unexpected_key_is_an_error_naming_it(tmp_path):
    path = _copy_ckpt(tmp_path, lambda t: t.__setitem__("language.model.layers.1.mlp.experts.8.up_proj.weight",
                                                        torch.zeros(64, 128)))
    with pytest.raises(KeyError, match=r"unexpected 1 \['language\.model\.layers\.1\.mlp\.experts\.8\.up_proj"):
        load_official(path)


def test_wrong_shape_is_an_error(tmp_path):
    path = _copy_ckpt(tmp_path, lambda t: t.__setitem__("view_seperator", torch.zeros(64)))
    with pytest.raises(ValueError, match="view_seperator"):
        load_official(path)


def _lang(**over) -> dict:
    cfg = _official_config()
    cfg["language_config"].update(over)
    return cfg


@pytest.mark.parametrize(
    "over, match",
    [
        ({"use_mla": False, "kv_lora_rank": 16}, "use_mla=false"),
        ({"use_mla": True, "kv_lora_rank": None}, "kv_lora_rank"),
        ({"topk_method": "noaux_tc", "scoring_func": "softmax"}, "scoring_func must be 'sigmoid'"),
        ({"scoring_func": "sigmoid"}, "greedy"),
        ({"norm_topk_prob": True}, "norm_topk_prob"),
        ({"topk_method": "bogus"}, "topk_method"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ],
)
def test_inconsistent_language_configs_are_refused(over, match):
    with pytest.raises(ValueError, match=match):
        parse_official_config(_lang(**over))


def test_other_config_checks():
    bad = copy.deepcopy(_official_config())
    bad["projector_config"]["n_embed"] = 64
    with pytest.raises(ValueError, match="n_embed"):
        parse_official_config(bad)
    bad = copy.deepcopy(_official_config())
    bad["model_type"] = "deepseek_v2"
    with pytest.raises(ValueError, match="deepseek_vl_v2"):
        parse_official_config(bad)
    bad = copy.deepcopy(_official_config())
    bad["projector_config"]["projector_type"] = "mlp_gelu"
    with pytest.raises(ValueError, match="downsample_mlp_gelu"):
        parse_official_config(bad)


def test_attention_and_routing_choice():
    tiny = parse_official_config(_official_config()).language
    assert tiny.attention.value == "mha" and tiny.routing_family == "deepseek_v2"
    mla = parse_official_config(_lang(use_mla=True, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                      v_head_dim=8)).language
    assert mla.attention.value == "mla"
    full = parse_official_config(_lang(use_mla=True, kv_lora_rank=16, qk_rope_head_dim=8, topk_method="noaux_tc",
                                       scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0))
    assert full.language.routing_family == "deepseek_v3"
    model = model_from_config(full.to_official_dict(), seed=0)
    assert type(model.language).__name__ == "DeepseekV3ForCausalLM"
    gate = model.language.model.layers[1].mlp.gate
    assert gate.norm_topk_prob and gate.routed_scaling_factor == 2.0 and gate.num_group == gate.topk_group == 1


def test_coverage_check_catches_a_gap_or_an_overlap():
    from dataclasses import replace

    from model_adapters.deepseek_vl2.loading import _check_coverage

    model = model_from_config(_official_config(), seed=0)
    layout = official_layout(model)
    state = model.state_dict()
    key = "language.model.layers.2.mlp.experts.3.up_proj.weight"
    gap = dict(layout)
    del gap[key]
    with pytest.raises(RuntimeError, match=r"language\.model\.layers\.2\.mlp\.experts\.gate_up_proj"):
        _check_coverage(gap, state)
    overlap = dict(layout)
    ot = layout["language.model.layers.2.mlp.experts.4.up_proj.weight"]
    overlap[key] = replace(ot, key=key)  # expert 4's slice written twice, expert 3's never
    with pytest.raises(RuntimeError, match="gate_up_proj"):
        _check_coverage(overlap, state)


def test_sharded_checkpoint_loads(tmp_path):
    tensors = load_file(str(CKPT / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(CKPT / "config.json", tmp_path / "config.json")
    sharded = load_official(tmp_path)
    whole = load_official(CKPT)
    for (a, x), (b, y) in zip(sharded.state_dict().items(), whole.state_dict().items(), strict=True):
        assert a == b and torch.equal(x, y), a


def test_unknown_keys_are_reported_and_kept(caplog):
    cfg = _lang(some_new_switch=3)
    with caplog.at_level("WARNING"):
        parsed = parse_official_config(cfg)
    assert "some_new_switch" in caplog.text
    assert parsed.to_official_dict()["language_config"]["some_new_switch"] == 3
