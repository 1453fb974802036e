"""Export of the vision-language families' compressed checkpoints: each is loaded by its adapter, and the
compressed-tensors export decompresses (with compressed-tensors' own code) to exactly the weights the compressed
model runs, and every tensor is named (and shaped) as in the family's hub checkpoints (routed experts split into
gate_proj / up_proj / down_proj; DeepSeek-VL2's vision encoder in its official layout). GPTQ refuses what its
format cannot hold, naming the module and the format that works."""

from __future__ import annotations

import json
import re

import pytest
import torch
from compressed_vlm import VLM_FAMILIES, compressed_vlm

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mcmoe_vl.export.compressed_tensors import export_compressed_tensors  # noqa: E402
from mcmoe_vl.export.gptq import export_gptq  # noqa: E402
from mcmoe_vl.export.modules import ExportError  # noqa: E402
from mcmoe_vl.quant.qlinear import DenseExpert, QuantExperts, QuantLinear  # noqa: E402

# where each family's hub checkpoints keep the decoder's routed experts
EXPERTS = {"deepseek_vl_v2": "language.model.layers.{i}.mlp.experts", "qwen3_vl_moe":
           "model.language_model.layers.{i}.mlp.experts"}


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def compressed(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "q"
    _, model, _, _ = compressed_vlm(request.param, out)
    return request.param, model, out


def _reference(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The dequantised float32 weights of the quantized linears, and the 16-bit expert linears, by hub name."""
    ref, dense = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantExperts):
            for e, ex in enumerate(mod.experts):
                if isinstance(ex, DenseExpert):
                    dense += [f"{name}.{e}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
                    continue
                g, u = ex.gate_up.packed.dequantize(torch.float32).chunk(2, dim=0)
                ref[f"{name}.{e}.gate_proj"], ref[f"{name}.{e}.up_proj"] = g, u
                ref[f"{name}.{e}.down_proj"] = ex.down.packed.dequantize(torch.float32)
        elif isinstance(mod, QuantLinear) and ".experts." not in name:
            ref[name] = mod.packed.dequantize(torch.float32)
    return ref, dense


def test_compressed_tensors_export_is_exact_under_hub_names(compressed, tmp_path):
    family, model, ckpt = compressed
    summary = export_compressed_tensors(ckpt, tmp_path / "ct")
    assert summary["one_bit_as_two"]  # the plan holds 1-bit experts
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["model_type"] == family
    qcfg = QuantizationConfig.model_validate(cfg["quantization_config"])
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    ref, dense = _reference(model)
    experts = EXPERTS[family].format(i=1)
    assert f"{experts}.0.gate_proj" in ref and f"{experts}.4.down_proj" in dense  # width 16 (compressed_vlm)
    for name, want in ref.items():
        scheme = next(s for s in qcfg.config_groups.values() if any(re.fullmatch(t[3:], name) for t in s.targets))
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        got = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert want.abs().sum() > 0 and torch.equal(got, want), name
    for name in dense:
        assert name in qcfg.ignore and f"{name}.weight" in tensors
    # every tensor of the family's hub checkpoint is there, quantized or not, and nothing else
    packed = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")
    written = {k for k in tensors if not k.endswith(packed)} | {f"{n}.weight" for n in ref}
    assert written == _hub_checkpoint_names(family)


def _hub_checkpoint_names(family: str) -> set[str]:
    """The tensor names of the family's original checkpoints, from an unquantized model of the same shape: the
    DeepSeek-VL2 port's official layout; Qwen3-VL-MoE's transformers names with each expert's projections apart."""
    if family == "deepseek_vl_v2":
        from mcmoe_vl.data.embedded import load_embedded_vlm
        from model_adapters.deepseek_vl2.loading import official_layout

        return set(official_layout(load_embedded_vlm()[0]))
    from tiny_models import tiny_qwen3_vl_moe

    state = tiny_qwen3_vl_moe().state_dict()
    names = {k for k in state if ".experts." not in k}
    for k, t in state.items():
        if k.endswith(".experts.gate_up_proj"):
            prefix = k.removesuffix(".gate_up_proj")
            names |= {f"{prefix}.{e}.{p}.weight" for e in range(t.shape[0]) for p in ("gate_proj", "up_proj",
                                                                                     "down_proj")}
    return names


def test_deepseek_vl2_official_tensors_are_the_official_layout():
    """The export's renaming of DeepSeek-VL2's 16-bit tensors equals the port's official layout (its loader's)."""
    from mcmoe_vl.data.embedded import load_embedded_vlm
    from model_adapters.deepseek_vl2.loading import official_state_dict, official_tensors

    model, _ = load_embedded_vlm()
    state = {k: v for k, v in model.state_dict().items() if ".mlp.experts." not in k}
    got, want = official_tensors(state), official_state_dict(model)
    assert "vision.blocks.0.attn.qkv.weight" in got and "vision.pos_embed" in got
    assert set(got) == {k for k in want if ".mlp.experts." not in k}
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    with pytest.raises(ValueError, match="needs q, k and v; got \\['k', 'v'\\]"):
        official_tensors({k: v for k, v in state.items() if not k.endswith("self_attn.q_proj.weight")})


# what the GPTQ format cannot hold in each tiny checkpoint: the tiny Qwen3-VL-MoE's vision attention has 16 inputs
# (GPTQ packs 32 at a time); a group of the embedded DeepSeek-VL2's projector has zero point 0 (GPTQ stores zero - 1)
GPTQ_REFUSALS = {"qwen3_vl_moe": r"model\.visual\.blocks\.0\.attn\.qkv: 48 outputs x 16 inputs; .*multiples of 32",
                 "deepseek_vl_v2": r"projector\.layers\.0: a group has zero point 0"}


def test_gptq_export_names_the_module_it_cannot_hold_and_what_works(compressed, tmp_path):
    family, _, ckpt = compressed
    with pytest.raises(ExportError, match=GPTQ_REFUSALS[family] + ".*use --format compressed-tensors"):
        export_gptq(ckpt, tmp_path / "gptq")
    assert not (tmp_path / "gptq" / "model.safetensors").exists()
