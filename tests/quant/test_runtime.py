import pytest
import torch
import torch.nn.functional as F

from mcmoe_vl.quant.gptq import gptq_quantize, hessian_from_inputs, prepare_inverse
from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.qlinear import QuantExpert, QuantLinear, Runtime, concat_rows
from mcmoe_vl.quant.quantizer import get_quantizer


def _packed(r, c, bits, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(r, c, generator=g) * 0.1
    x = torch.randn(3 * c, c, generator=g)
    inv = prepare_inverse(hessian_from_inputs(x), act_order=act_order)
    res = gptq_quantize(w, inv, get_quantizer(bits))
    return res, PackedTensor.from_result(res)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_packed_and_fake_quant_are_bit_identical(bits, act_order):
    res, p = _packed(40, 200, bits, act_order)  # 200 columns: a partial last group
    assert (p.perm is not None) == act_order
    torch.testing.assert_close(p.dequantize(torch.float32), res.weight, rtol=0, atol=0)
    lin = QuantLinear(p, torch.randn(40), dtype=torch.bfloat16)
    x = torch.randn(2, 5, 200).bfloat16()
    y_packed = lin(x)
    assert lin.weight_cache is None  # packed: nothing dense is held
    lin.set_runtime(Runtime.FAKE)
    assert lin.weight_cache is not None and lin.weight_cache.dtype == torch.bfloat16
    y_fake = lin(x)
    assert torch.equal(y_packed, y_fake)
    # and both are y = x W^T + b with the dequantized weight
    ref = F.linear(x.double(), res.weight.bfloat16().double(), lin.bias.double())
    torch.testing.assert_close(y_packed.double(), ref, rtol=2e-2, atol=2e-2)


def test_packed_memory_is_the_true_width():
    _, p = _packed(256, 512, 2, False)
    assert p.qdata.numel() == 256 * 512 * 2 // 8
    assert p.nbytes * 8 / p.numel == pytest.approx(2 + 32 / 128)  # codes + fp16 scale and zero per 128


def test_quant_expert_computes_swiglu():
    _, g = _packed(64, 128, 3, True, seed=1)
    _, u = _packed(64, 128, 3, True, seed=1)  # same Hessian -> same permutation, as gate/up share it
    _, d = _packed(128, 64, 3, False, seed=2)
    exp = QuantExpert(QuantLinear(d, dtype=torch.float32), F.silu,
                      gate_up=QuantLinear(concat_rows(g, u), dtype=torch.float32))
    sep = QuantExpert(QuantLinear(d, dtype=torch.float32), F.silu, gate=QuantLinear(g, dtype=torch.float32),
                      up=QuantLinear(u, dtype=torch.float32))
    x = torch.randn(7, 128)
    G, U, D = (t.dequantize(torch.float64) for t in (g, u, d))
    ref = (F.silu(x.double() @ G.t()) * (x.double() @ U.t())) @ D.t()
    for m in (exp, sep):
        y = m(x)
        assert y.shape == (7, 128) and y.abs().sum() > 0
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


def test_stack_and_index_and_validation():
    _, a = _packed(16, 128, 4, False, 0)
    _, b = _packed(16, 128, 4, False, 1)
    s = PackedTensor.stack([a, b])
    assert s.shape == (2, 16, 128)
    assert torch.equal(s.dequantize()[1], b.dequantize()) and torch.equal(s[0].dequantize(), a.dequantize())
    with pytest.raises(ValueError, match="scale has shape"):
        PackedTensor(a.qdata, a.scale[:, :0], a.zero, None, a.meta)
