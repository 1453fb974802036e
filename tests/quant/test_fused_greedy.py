"""Greedy decoding with the packed runtime's SIMD kernels and fused MoE layers equals the fake-quant runtime on the
embedded (trained) models: in float32 on every CPU, in bfloat16 where the AVX512-BF16 path runs."""

import pytest
import torch

from mcmoe_vl.data.embedded import load_embedded_mixtral, load_embedded_vlm
from mcmoe_vl.quant import kernels
from mcmoe_vl.quant.checkpoint import load_quantized, save_quantized
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.native import Isa
from mcmoe_vl.quant.plan import BitPlan
from mcmoe_vl.quant.qlinear import Kernel, QuantExperts, Runtime, set_kernel, set_runtime
from model_adapters import get_adapter

PROMPTS = ["def read_file(path):\n    \"\"\"", "Return the number of", "class Parser:\n    def "]


def _plan(model, gs=128):
    layers = {la.index: la.num_experts for la in get_adapter(model).moe_layers(model)}
    return BitPlan.from_experts({i: [(2, 3, 1, 4, 2, 3, 2, 2)[e % 8] for e in range(n)] for i, n in layers.items()},
                                group_size=gs)


def _greedy(model, ids, n):
    """n greedy tokens, recomputing the whole prefix each step (no cache: the same on every model class)."""
    for _ in range(n):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def _fused_matches_eager(packed, monkeypatch) -> list[float]:
    """Check every fused MoE call of ``packed`` against the eager per-expert loop on the same inputs."""
    orig, errs = QuantExperts.forward, []

    def forward(self, h, idx, w):
        y = orig(self, h, idx, w)
        fused, self._fused = self._fused, False
        ref = orig(self, h, idx, w)
        self._fused = fused
        err = float((y.float() - ref.float()).abs().max())
        assert err <= 2.0 ** -6 * float(ref.float().abs().max()) + 1e-3, err  # bfloat16 round-off of the output
        errs.append(err)
        return y

    monkeypatch.setattr(QuantExperts, "forward", forward)
    return errs


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the AVX512-BF16 path where available
def test_mixtral_tiny_packed_simd_greedy_equals_fake(native_lib, tmp_path, dtype, monkeypatch):
    torch.set_num_threads(1)
    model, tok = load_embedded_mixtral(dtype=dtype)
    calib = [{"input_ids": torch.tensor([tok(p * 4)["input_ids"][:64]])} for p in PROMPTS]
    plan = _plan(model)
    report = quantize_model(model, plan, calib, QuantizeConfig(progress=False, min_tokens=4),
                            adapter=get_adapter(model))
    save_quantized(model, tmp_path, plan=plan, report=report, adapter=get_adapter(model))
    packed = load_quantized(tmp_path, runtime=Runtime.PACKED, kernel=Kernel.SIMD)
    fake = load_quantized(tmp_path, runtime=Runtime.FAKE)
    # bfloat16: the AVX512-BF16 path rounds as the bfloat16 model does, and greedy tokens are equal. The float32
    # paths (CPUs without AVX512-BF16) agree with it to bfloat16 round-off, which can flip a near-tie in top-k
    # routing and from there the text: there every fused call is checked against the eager loop instead.
    bf16_path = dtype == torch.float32 or bool(native_lib.mq_cpu_bf16()) and kernels.resolve_isa(None) in (
        -1, int(Isa.AVX512_BF16))
    checked = [] if bf16_path else _fused_matches_eager(packed, monkeypatch)
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok(p)["input_ids"]])
            if dtype == torch.float32:
                a = packed.generate(ids, max_new_tokens=16, do_sample=False)  # cached decode: 1-token fused steps
                b = fake.generate(ids, max_new_tokens=16, do_sample=False)
                assert a.shape[1] == ids.shape[1] + 16
                assert torch.equal(a, b), (tok.decode(a[0]), tok.decode(b[0]))
            else:
                a = packed.generate(ids, max_new_tokens=16, do_sample=False)
                b = fake.generate(ids, max_new_tokens=16, do_sample=False)
                assert a.shape[1] == ids.shape[1] + 16
                if bf16_path:
                    assert torch.equal(a, b), (tok.decode(a[0]), tok.decode(b[0]))
    assert bf16_path or len(checked) >= 16 * len(PROMPTS)  # every decode step of every layer was compared
    fused = [m for m in packed.modules() if isinstance(m, QuantExperts)]
    assert fused and all(m.fused() is not None for m in fused)  # the decode ran through the fused layers
    assert next(packed.parameters()).dtype == dtype


@pytest.mark.slow
def test_deepseek_vl2_tiny_packed_simd_greedy_equals_fake(native_lib):
    torch.set_num_threads(1)
    model, proc = load_embedded_vlm()
    tok = proc.tokenizer
    calib = [{"input_ids": torch.tensor([tok(p * 4)["input_ids"][:48]])} for p in PROMPTS]
    quantize_model(model, _plan(model, gs=32), calib, QuantizeConfig(progress=False, min_tokens=4),
                   adapter=get_adapter(model))
    with torch.no_grad():
        for p in PROMPTS[:2]:
            ids = torch.tensor([tok(p)["input_ids"]])
            set_runtime(model, Runtime.PACKED)
            set_kernel(model, Kernel.SIMD)
            a = _greedy(model, ids, 8)
            set_runtime(model, Runtime.FAKE)
            b = _greedy(model, ids, 8)
            assert torch.equal(a, b), (tok.decode(a[0]), tok.decode(b[0]))
    set_runtime(model, Runtime.PACKED)
    fused = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert fused and all(m.fused() is not None for m in fused)
