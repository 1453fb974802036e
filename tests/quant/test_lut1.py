"""The 1-bit table-lookup decode kernel (csrc/mq_lut1.c) against the float64 product of the dequantised weight."""

import pytest
import torch
from native_lib import isas

from mcmoe_vl.moe.fused import FusedMoE
from mcmoe_vl.quant import kernels
from mcmoe_vl.quant.gptq import rtn_quantize
from mcmoe_vl.quant.native import Isa
from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.qlinear import QuantExpert, QuantLinear, concat_rows
from mcmoe_vl.quant.quantizer import get_quantizer

# rows: fewer than 16, exactly 16 (the last block is whole), a whole block then a tail, several blocks + tail;
# (cols, group): one group of 128, groups of 256 (two 128-column blocks each), one group of the whole row, 34
# groups (scales are transposed 16 groups at a time: two whole sets and a partial one)
SHAPES = [(7, 256, 128), (16, 512, 256), (48, 384, 384), (33, 1024, 128), (20, 4352, 128)]


def _packed(r, c, gs, perm, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = PackedTensor.from_result(rtn_quantize(torch.randn(r, c, generator=g), get_quantizer(1), group_size=gs))
    if perm:
        p = PackedTensor(p.qdata, p.scale, p.zero, torch.randperm(c, generator=g).to(torch.int32), p.meta)
    return p


def _close(y, x, p):
    w = p.dequantize(torch.float64)
    ref = x.double() @ w.t()
    bound = x.double().abs() @ w.abs().t()
    assert ref.abs().max() > 1 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= 2e-6 * bound + 1e-30).all(), (y.double() - ref).abs().max()


@pytest.fixture
def lut_cpu(native_lib):
    if Isa.AVX512 not in isas(native_lib):
        pytest.skip("the table-lookup kernel runs on AVX-512 CPUs")
    old = kernels.set_lut1(True)
    yield native_lib
    kernels.set_lut1(old)


def _has_bf16(lib) -> bool:
    return bool(lib.mq_cpu_bf16())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("perm", [False, True], ids=["natural", "act-order"])
def test_lut1_matches_the_float64_product(lut_cpu, shape, perm):
    r, c, gs = shape
    p = _packed(r, c, gs, perm, seed=r)
    dtypes = [torch.float32] + ([torch.bfloat16] if _has_bf16(lut_cpu) else [])
    for dtype in dtypes:
        for t in (1, 2):
            x = torch.randn(t, c).to(dtype)
            isa = "avx512" if dtype == torch.float32 else "avx512_bf16"
            y = kernels.packed_matmul(x, p, isa=isa)
            _close(y, x, p)
            # the table lookup ran: the other kernel sums in another order, so some result differs in its last bits
            kernels.set_lut1(False)
            try:
                other = kernels.packed_matmul(x, p, isa=isa)
            finally:
                kernels.set_lut1(True)
            _close(other, x, p)
            assert not torch.equal(y, other)


def test_lut1_threads_and_batches_agree(lut_cpu):
    p = _packed(300, 512, 128, perm=True)
    x = torch.randn(2, 512)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = kernels.packed_matmul(x, p, isa="avx512")
        torch.set_num_threads(2)
        y2 = kernels.packed_matmul(x, p, isa="avx512")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)
    # one token alone gives the same row values as in a pair (each token has its own tables)
    assert torch.equal(kernels.packed_matmul(x[1:], p, isa="avx512")[0], y1[1])


def test_lut1_in_the_fused_moe_layer(lut_cpu):
    """1-bit experts in the fused MoE call (decode: one token per expert) equal the expert loop of QuantLinears."""
    H, I = 256, 384

    def lin(r, c, seed):
        g = torch.Generator().manual_seed(seed)
        return PackedTensor.from_result(rtn_quantize(torch.randn(r, c, generator=g) * 0.1, get_quantizer(1)))

    experts = [QuantExpert(QuantLinear(lin(H, I, 10 * e + 2), dtype=torch.float32), torch.nn.functional.silu,
                           gate_up=QuantLinear(concat_rows(lin(I, H, 10 * e), lin(I, H, 10 * e + 1)),
                                               dtype=torch.float32)) for e in range(3)]
    fused = FusedMoE.build(experts, [], max_tokens=4)
    x = torch.randn(1, H)
    idx = torch.tensor([[2, 0]])
    w = torch.tensor([[0.7, 0.3]])
    ref = sum(w[0, j].double() * experts[idx[0, j]](x)[0].double() for j in range(2))
    out = fused(x, idx, w)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-4, atol=1e-5)
    kernels.set_lut1(False)
    try:
        assert not torch.equal(fused(x, idx, w), out)  # the table lookup ran in the fused call
    finally:
        kernels.set_lut1(True)
