"""compressed-tensors export: its own decompression gives back exactly the weights the compressed model runs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mcmoe_vl.cli import main  # noqa: E402
from mcmoe_vl.export.modules import ExportError  # noqa: E402
from mcmoe_vl.quant.checkpoint import load_quantized, save_quantized  # noqa: E402
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model  # noqa: E402
from mcmoe_vl.quant.plan import BitPlan  # noqa: E402
from mcmoe_vl.quant.qlinear import QuantExperts, QuantLinear  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "quant"))
from tiny import batches, tiny_mixtral_q  # noqa: E402

from model_adapters import get_adapter  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model = tiny_mixtral_q(dtype=torch.bfloat16)
    plan = BitPlan.from_experts({0: [2, 3, 1, 4], 1: [1, 2, 16, 3]}, model_type="mixtral")
    report = quantize_model(model, plan, batches(2), QuantizeConfig(progress=False, min_tokens=1),
                            adapter=get_adapter(model))
    out = tmp_path_factory.mktemp("ct") / "q"
    save_quantized(model, out, plan=plan, report=report, adapter=get_adapter(model))
    return out


def _reference_weights(model) -> dict[str, torch.Tensor]:
    """Our dequantised float32 weights under the exported (hub) names."""
    ref = {}
    for name, mod in model.named_modules():
        hub = name.replace(".mlp.", ".block_sparse_moe.")
        if isinstance(mod, QuantExperts):
            for e, ex in enumerate(mod.experts):
                if hasattr(ex, "gate_up") and isinstance(ex.gate_up, QuantLinear):
                    g, u = ex.gate_up.packed.dequantize(torch.float32).chunk(2, dim=0)
                    ref[f"{hub}.{e}.w1"], ref[f"{hub}.{e}.w3"] = g, u
                    ref[f"{hub}.{e}.w2"] = ex.down.packed.dequantize(torch.float32)
        elif isinstance(mod, QuantLinear) and ".experts." not in name:
            ref[hub] = mod.packed.dequantize(torch.float32)
    return ref


def test_round_trip_through_compressed_tensors_is_exact(ckpt, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(ckpt), "--format", "compressed-tensors", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "1-bit linears written as 2-bit codes" in said and "6 1-bit" in said  # 2 experts x (w1, w3, w2)
    cfg = json.loads((out / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert qcfg.format == "pack-quantized" and cfg["model_type"] == "mixtral"
    tensors = load_file(str(out / "model.safetensors"))
    ref = _reference_weights(load_quantized(ckpt))
    assert len(ref) == 2 * 4 + (4 + 3) * 3  # attention (4 per layer) + quantized experts x (w1, w3, w2)
    widths = set()
    for name, want in ref.items():
        scheme = next(s for s in qcfg.config_groups.values()
                      if any(re.fullmatch(t[3:], name) for t in s.targets))
        widths.add(scheme.weights.num_bits)
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        got = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert got.dtype == torch.float32 and want.abs().sum() > 0
        assert torch.equal(got, want), name
    assert widths == {2, 3, 4}  # 1-bit went to 2-bit codes
    # the 16-bit expert and the unquantized tensors are there as they were
    assert "model.layers.1.block_sparse_moe.experts.2.w1.weight" in tensors
    assert "model.layers.1.block_sparse_moe.experts.2.w1" in qcfg.ignore
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" in tensors


def test_act_order_and_own_directory_are_refused(ckpt, tmp_path):
    from mcmoe_vl.export.compressed_tensors import export_compressed_tensors
    from mcmoe_vl.quant.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="source model's directory"):
        export_compressed_tensors(ckpt, ckpt)
    model = tiny_mixtral_q(dtype=torch.bfloat16)
    plan = BitPlan.from_experts({0: [2] * 4, 1: [2] * 4}, model_type="mixtral")
    report = quantize_model(model, plan, batches(2), QuantizeConfig(progress=False, min_tokens=1, act_order=True),
                            adapter=get_adapter(model))
    save_quantized(model, tmp_path / "ao", plan=plan, report=report, adapter=get_adapter(model))
    with pytest.raises(ExportError, match="act-order"):
        export_compressed_tensors(tmp_path / "ao", tmp_path / "ao-ct")
    assert not (tmp_path / "ao-ct" / "model.safetensors").exists()
