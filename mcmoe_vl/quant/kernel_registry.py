"""Which kernel multiplies a token batch by a packed weight, keyed by device and width: the seam for GPU kernels.

``QuantLinear`` with ``Kernel.SIMD`` asks :func:`find_packed_matmul` for ``(x.device.type, bits)``. On the CPU the
native kernels are registered for 1-4 bits (:func:`mcmoe_vl.quant.kernels.cpu_matmul`: the SIMD
product for decode, dequantise-once + GEMM for prefill). No CUDA kernel is
registered: on a GPU the packed runtime dequantises the weight with torch (``PackedTensor.dequantize``, which runs
on any device) and calls ``F.linear``. A CUDA kernel plugs in with::

    from mcmoe_vl.quant.kernel_registry import PackedKernel, register_packed_matmul
    register_packed_matmul("cuda", 2, PackedKernel("my-cuda-2bit", my_fn))   # my_fn(x (..., C), packed) -> (..., R)

A kernel reads the storage of :class:`~mcmoe_vl.quant.packed.PackedTensor` as it is (codes packed along rows,
float16 scale and zero per (row, group), optional column permutation) and returns float32 or ``x.dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mcmoe_vl.registry import Registry

from . import kernels
from .packed import PackedTensor


@dataclass(frozen=True)
class PackedKernel:
    name: str
    fn: Callable[[torch.Tensor, PackedTensor], torch.Tensor]
    available: Callable[[], bool] = lambda: True  # e.g. the native library is built
    accepts: Callable[[PackedTensor], bool] = lambda p: True  # e.g. float16 parameters only


PACKED_MATMUL: Registry[PackedKernel] = Registry(
    "packed matmul kernel", how_to_add="Register one with register_packed_matmul(device, bits, kernel).")


def _key(device: str, bits: int) -> str:
    return f"{device}:{bits}"


def register_packed_matmul(device: str, bits: int, kernel: PackedKernel) -> PackedKernel:
    """Register ``kernel`` for weights of ``bits`` on ``device`` (``"cpu"``, ``"cuda"``, ...)."""
    return PACKED_MATMUL.register(_key(device, bits), kernel)


def find_packed_matmul(device: str, p: PackedTensor) -> PackedKernel | None:
    """The kernel registered for ``(device, p.bits)`` if it is usable for ``p`` now, else None (dequantise)."""
    key = _key(device, p.meta.bits)
    if key not in PACKED_MATMUL:
        return None
    k = PACKED_MATMUL.get(key)
    return k if k.available() and k.accepts(p) else None


for _bits in (1, 2, 3, 4):
    register_packed_matmul("cpu", _bits, PackedKernel("native-simd", kernels.cpu_matmul, kernels.available,
                                                      kernels.supports))
