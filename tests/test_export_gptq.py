"""GPTQ export: codes, zeros and scales read back with an independent unpacker (compressed-tensors' dense int32
bit stream, the same layout GPTQ uses) give exactly the weights the compressed model runs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mcmoe_vl.cli import main  # noqa: E402
from mcmoe_vl.export.gptq import pack_bitstream  # noqa: E402
from mcmoe_vl.quant.checkpoint import load_quantized, save_quantized  # noqa: E402
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model  # noqa: E402
from mcmoe_vl.quant.plan import BitPlan  # noqa: E402
from model_adapters import get_adapter  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_export_compressed_tensors import _reference_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "quant"))
from tiny import batches, tiny_mixtral_q  # noqa: E402


def _unpack(words: torch.Tensor, bits: int, shape: tuple[int, int], dim: int) -> torch.Tensor:
    return unpack_from_int32(words, bits, torch.Size(shape), packed_dim=dim).to(torch.int64) + (1 << (bits - 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitstream_matches_an_independent_unpacker(bits):
    codes = torch.randint(0, 2**bits, (64, 40), generator=torch.Generator().manual_seed(bits))
    words = pack_bitstream(codes, bits)
    assert words.shape == (64 * bits // 32, 40) and words.dtype == torch.int32
    assert torch.equal(_unpack(words, bits, (64, 40), 0), codes)
    if bits == 3:  # GPTQ's three-word layout: value 10 straddles words 0 and 1 at bits 30..32
        one = torch.zeros(32, 1, dtype=torch.int64)
        one[10] = 0b101
        assert pack_bitstream(one, 3)[:, 0].tolist() == [1 << 30, 1, 0]


def test_gptq_export_reads_back_exactly(tmp_path, capsys):
    model = tiny_mixtral_q(dtype=torch.bfloat16)
    plan = BitPlan.from_experts({0: [2, 3, 1, 4], 1: [1, 2, 16, 3]}, model_type="mixtral")
    report = quantize_model(model, plan, batches(2), QuantizeConfig(progress=False, min_tokens=1),
                            adapter=get_adapter(model))
    save_quantized(model, tmp_path / "q", plan=plan, report=report, adapter=get_adapter(model))
    out = tmp_path / "gptq"
    assert main(["export", str(tmp_path / "q"), "--format", "gptq", "-o", str(out)]) == 0
    assert "6 1-bit linears written as 2-bit codes" in capsys.readouterr().out
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["checkpoint_format"] == "gptq" and qcfg["group_size"] == 128
    tensors = load_file(str(out / "model.safetensors"))
    ref = _reference_weights(load_quantized(tmp_path / "q"))
    seen_bits = set()
    for name, want in ref.items():
        bits = next((v["bits"] for k, v in qcfg["dynamic"].items() if k.startswith("+:") and re.fullmatch(k[2:], name)),
                    qcfg["bits"])
        seen_bits.add(bits)
        n, k = want.shape
        codes = _unpack(tensors[f"{name}.qweight"], bits, (k, n), 0)  # (K, N)
        zeros = _unpack(tensors[f"{name}.qzeros"], bits, (k // 128, n), 1) + 1  # stored as zero - 1
        scales = tensors[f"{name}.scales"].float()  # (G, N)
        w = scales.repeat_interleave(128, 0) * (codes - zeros.repeat_interleave(128, 0)).float()
        assert torch.equal(w.t(), want), name
        assert torch.equal(tensors[f"{name}.g_idx"], torch.arange(k, dtype=torch.int32) // 128)
    assert seen_bits == {2, 3, 4}
    assert any(k.startswith("-:") and "experts\\.2\\.w1" in k for k in qcfg["dynamic"])  # the 16-bit expert
