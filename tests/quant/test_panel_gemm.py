"""The prefill panel GEMM (csrc/mq_panel_bf16.c) against the float64 product of the bf16-rounded dequantised weight."""

import pytest
import torch
import torch.nn.functional as F

from mcmoe_vl.quant import kernels
from mcmoe_vl.quant.gptq import rtn_quantize
from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.quantizer import get_quantizer

# (rows, cols, group): rows not a multiple of 16 or 32 and fewer than a panel; several panels with a partial last
# one; a group of the whole row; columns over one 2048-column block (a partial last block)
SHAPES = [(37, 256, 128), (300, 1024, 256), (64, 640, 640), (40, 2304, 128)]


@pytest.fixture
def bf16_cpu(native_lib):
    if not native_lib.mq_cpu_bf16():
        pytest.skip("the panel GEMM runs on CPUs with AVX512-BF16")
    return native_lib


def _packed(bits, r, c, gs, perm, seed):
    g = torch.Generator().manual_seed(seed)
    p = PackedTensor.from_result(rtn_quantize(torch.randn(r, c, generator=g), get_quantizer(bits), group_size=gs))
    if perm:
        p = PackedTensor(p.qdata, p.scale, p.zero, torch.randperm(c, generator=g).to(torch.int32), p.meta)
    return p


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_panel_gemm_is_the_bf16_weight_product(bf16_cpu, bits, shape):
    r, c, gs = shape
    for perm in (False, True):
        p = _packed(bits, r, c, gs, perm, seed=r + bits)
        wb = p.dequantize(torch.float32).bfloat16().double()  # the weight as the bf16 model holds it
        for t in (1, 5, 12, 13, 31):  # token tiles of 12, 8, 4, 2 and 1
            x = torch.randn(t, c).bfloat16()
            ref = x.double() @ wb.t()
            bound = x.double().abs() @ wb.abs().t()
            y = kernels.panel_matmul(x, p, torch.float32)
            assert ref.abs().max() > 1
            assert ((y.double() - ref).abs() <= 2e-6 * bound + 1e-30).all(), (bits, perm, t)
            # the bf16 result is F.linear's on the dequantised bf16 weight up to its last bf16 rounding
            yb = kernels.panel_matmul(x, p)
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.float(), F.linear(x, wb.bfloat16()).float(), rtol=1.6e-2, atol=1e-2)


def test_panel_gemm_threads_agree(bf16_cpu):
    p = _packed(2, 300, 2304, 128, True, 7)
    x = torch.randn(40, 2304).bfloat16()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = kernels.panel_matmul(x, p, torch.float32)
        torch.set_num_threads(2)
        y2 = kernels.panel_matmul(x, p, torch.float32)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)  # panels are split between threads; each output's arithmetic is the same


def test_panel_gemm_refuses_what_it_cannot_run(native_lib):
    p = _packed(2, 16, 320, 64, False, 1)
    with pytest.raises(ValueError, match="multiples of 128"):
        kernels.panel_matmul(torch.randn(20, 320).bfloat16(), p)
    with pytest.raises(ValueError, match="bfloat16 tokens"):
        kernels.panel_matmul(torch.randn(20, 256), _packed(2, 16, 256, 128, False, 1))
