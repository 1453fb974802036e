"""Export of the vision-language families' compressed checkpoints: each is loaded by its adapter, and the
compressed-tensors export decompresses (with compressed-tensors' own code) to exactly the weights the compressed
model runs, under the names of the family's hub checkpoints (routed experts split into gate_proj / up_proj /
down_proj). GPTQ refuses what its format cannot hold, naming the module and the format that works."""

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
    # the rest of the model (vision encoder, embeddings, head) is there under the loaded model's names
    state = {k for k in model.state_dict() if ".experts." not in k and not any(k.startswith(n + ".") for n in ref)}
    assert state and state <= set(tensors)


# what the GPTQ format cannot hold in each tiny checkpoint: the tiny Qwen3-VL-MoE's vision attention has 16 inputs
# (GPTQ packs 32 at a time); a group of the embedded DeepSeek-VL2's projector has zero point 0 (GPTQ stores zero - 1)
GPTQ_REFUSALS = {"qwen3_vl_moe": r"model\.visual\.blocks\.0\.attn\.qkv: 48 outputs x 16 inputs; .*multiples of 32",
                 "deepseek_vl_v2": r"projector\.layers\.0: a group has zero point 0"}


def test_gptq_export_names_the_module_it_cannot_hold_and_what_works(compressed, tmp_path):
    family, _, ckpt = compressed
    with pytest.raises(ExportError, match=GPTQ_REFUSALS[family] + ".*use --format compressed-tensors"):
        export_gptq(ckpt, tmp_path / "gptq")
    assert not (tmp_path / "gptq" / "model.safetensors").exists()
