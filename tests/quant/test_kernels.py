import pytest
import torch

from mcmoe_vl.quant import kernels
from mcmoe_vl.quant.gptq import gptq_quantize, hessian_from_inputs, prepare_inverse
from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.qlinear import Kernel, QuantLinear, Runtime
from mcmoe_vl.quant.quantizer import get_quantizer



def _packed(bits, act_order, r=33, c=328):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(r, c, generator=g)
    x = torch.randn(2 * c, c, generator=g)
    return PackedTensor.from_result(gptq_quantize(w, prepare_inverse(hessian_from_inputs(x), act_order=act_order),
                                                  get_quantizer(bits)))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_native_kernels(native_lib, bits, act_order):  # the fixture builds the library when it is not built
    p = _packed(bits, act_order)  # 328 columns: a partial last group, and not a multiple of 16 codes
    lin_native = QuantLinear(p, dtype=torch.bfloat16, kernel=Kernel.NATIVE)
    lin_torch = QuantLinear(p, dtype=torch.bfloat16, kernel=Kernel.TORCH)
    assert torch.equal(lin_native.weight(), lin_torch.weight())  # the same values: bit-identical runtimes
    x = torch.randn(3, 328).bfloat16()
    y = lin_native(x)
    lin_native.set_runtime(Runtime.FAKE)
    assert torch.equal(y, lin_native(x))
    # LUT products from the packed codes equal the float64 product of the dequantised weight
    ref = x.double() @ p.dequantize(torch.float64).t()
    lut = kernels.lut_matmul(x, p)
    assert lut.shape == (3, 33) and ref.abs().max() > 1
    torch.testing.assert_close(lut.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    lin_lut = QuantLinear(p, dtype=torch.float32, kernel=Kernel.LUT)
    torch.testing.assert_close(lin_lut(x.float()[:1]).double(), ref[:1], rtol=1e-4, atol=1e-3)
