"""Modules that run packed weights: :class:`QuantLinear`, :class:`QuantExpert`, :class:`QuantExperts`.

Two runtimes, one code path:

- ``Runtime.PACKED``: only the packed buffers (``qdata``, ``scale``, ``zero``, ``perm``) are held; every forward
  dequantises the weight to the input's dtype (:meth:`PackedTensor.dequantize`) and calls ``F.linear``.
- ``Runtime.FAKE``: the same module additionally caches that dequantised weight (16-bit), so a forward is a plain
  ``F.linear``; memory is that of the unquantized model, speed too. For fast accuracy evaluation.

Both compute ``F.linear(x, W)`` with the bitwise-same ``W``, so their outputs are bit-identical.

:class:`QuantExpert` is one routed expert ``y = down(act(gate x) * up x)`` mapping (t, H) -> (t, H), usable with
:meth:`mcmoe_vl.moe.MoELayer.set_expert`. :class:`QuantExperts` replaces a transformers-5 fused experts module
(``gate_up_proj`` / ``down_proj`` 3-D tensors) and computes exactly its eager loop.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernel_registry, kernels
from .packed import PackedMeta, PackedTensor



class Runtime(str, enum.Enum):
    PACKED = "packed"  # dequantise on the fly; memory at the true bit width
    FAKE = "fake"  # dequantised 16-bit weights cached; for fast evaluation


class Kernel(str, enum.Enum):
    """How the packed runtime computes ``x W^T``.

    ``AUTO`` / ``NATIVE`` / ``TORCH`` dequantise the whole weight (native C loop when compiled, else torch) to the
    same values and call ``F.linear``: bit-identical to the fake-quant runtime. ``SIMD`` runs the kernel
    registered for the input's device and the width (:mod:`mcmoe_vl.quant.kernel_registry`; on the CPU
    :func:`mcmoe_vl.quant.kernels.cpu_matmul`: decode-sized batches straight from the packed codes with the native
    AVX-512 / AVX2 / scalar kernels in float32, prefill by one SIMD dequantisation into a reused buffer and a
    dense GEMM): equal to the dequantised product to float32 round-off, not bitwise. Without a kernel for the
    device it dequantises like ``AUTO``. A MoE layer whose experts all use ``SIMD`` runs them in
    one native call (:mod:`mcmoe_vl.moe.fused`). ``LUT`` is the earlier scalar table-lookup kernel (up to
    ``LUT_MAX_TOKENS`` tokens).
    """

    AUTO = "auto"
    NATIVE = "native"
    TORCH = "torch"
    LUT = "lut"
    SIMD = "simd"


LUT_MAX_TOKENS = 4


def dequantize(p: PackedTensor, dtype: torch.dtype, kernel: Kernel = Kernel.AUTO) -> torch.Tensor:
    """``p.dequantize(dtype)``, through the native loop when available (the same float32 values, then cast)."""
    native = kernel is not Kernel.TORCH and len(p.meta.shape) == 2 and p.meta.group_size % 8 == 0
    if native and kernels.available() and p.scale.dtype == torch.float16:
        w = kernels.dequantize_native(p)  # (R, C) float32, storage column order
        if p.perm is not None:
            w = w.index_select(1, torch.argsort(p.perm.long()))
        return w.to(dtype)
    if kernel is Kernel.NATIVE:
        raise RuntimeError("the native kernels are not available (no C compiler?); use kernel='auto' or 'torch'")
    return p.dequantize(dtype)


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored packed (see the module docstring for the two runtimes)."""

    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None = None, *,
                 runtime: Runtime = Runtime.PACKED, dtype: torch.dtype = torch.bfloat16,
                 kernel: Kernel = Kernel.AUTO) -> None:
        super().__init__()
        if len(packed.meta.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D packed weight, got shape {packed.meta.shape}")
        self.meta = packed.meta
        self.out_features, self.in_features = packed.meta.shape
        for name, t in packed.tensors().items():
            self.register_buffer(name, t)
        if packed.zero is None:
            self.zero = None
        if packed.perm is None:
            self.perm = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.dtype = dtype
        self.kernel = Kernel(kernel)
        self.register_buffer("weight_cache", None, persistent=False)
        self.runtime = Runtime.PACKED
        self.set_runtime(runtime)

    @property
    def packed(self) -> PackedTensor:
        return PackedTensor(self.qdata, self.scale, self.zero, self.perm, self.meta)

    def set_runtime(self, runtime: Runtime) -> None:
        self.runtime = Runtime(runtime)
        self.weight_cache = self.packed.dequantize(self.dtype) if self.runtime is Runtime.FAKE else None

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # noqa: D401 - a method, not a Parameter
        """The dequantised weight (out, in)."""
        dtype = dtype or self.dtype
        if self.weight_cache is not None and self.weight_cache.dtype == dtype:
            return self.weight_cache
        return dequantize(self.packed, dtype, self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel is Kernel.SIMD and self.weight_cache is None:
            k = kernel_registry.find_packed_matmul(x.device.type, self.packed)
            if k is not None:
                y = k.fn(x, self.packed).to(x.dtype)
                return y if bias is None else y + bias
        if (self.kernel is Kernel.LUT and self.weight_cache is None and x.numel() // self.in_features <= LUT_MAX_TOKENS
                and kernels.available() and self.meta.group_size % 8 == 0):
            y = kernels.lut_matmul(x, self.packed).to(x.dtype)
            return y if bias is None else y + bias
        return F.linear(x, self.weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.meta.bits}, "
                f"group={self.meta.group_size}, runtime={self.runtime.value}")


def concat_rows(a: PackedTensor, b: PackedTensor) -> PackedTensor:
    """Stack two packed matrices with the same columns, width and permutation along the rows ([a; b])."""
    if a.meta.bits != b.meta.bits or a.meta.cols != b.meta.cols or a.meta.group_size != b.meta.group_size:
        raise ValueError("can only concatenate packed matrices of equal width, columns and group size")
    if (a.perm is None) != (b.perm is None) or (a.perm is not None and not torch.equal(a.perm, b.perm)):
        raise ValueError("can only concatenate packed matrices with the same column permutation")
    zero = None if a.zero is None else torch.cat([a.zero, b.zero], dim=-2)
    meta = PackedMeta(a.meta.bits, (a.meta.rows + b.meta.rows, a.meta.cols), a.meta.group_size)
    return PackedTensor(torch.cat([a.qdata, b.qdata], dim=-2), torch.cat([a.scale, b.scale], dim=-2), zero,
                        a.perm, meta)


class QuantExpert(nn.Module):
    """One routed expert ``(t, H) -> (t, H)``: ``down(act(gate x) * up x)`` with packed weights.

    ``gate_up`` holds [gate; up] (2I, H) in one matrix when the model computes them in one product (fused
    storage), so the result equals the model's own arithmetic; otherwise ``gate`` and ``up`` are separate.
    """

    def __init__(self, down: QuantLinear, act_fn: Callable[[torch.Tensor], torch.Tensor], *,
                 gate_up: QuantLinear | None = None, gate: QuantLinear | None = None,
                 up: QuantLinear | None = None) -> None:
        super().__init__()
        if (gate_up is None) == (gate is None or up is None):
            raise ValueError("give either gate_up, or gate and up")
        self.gate_up, self.gate, self.up, self.down = gate_up, gate, up, down
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (t, H) -> (t, H)
        if self.gate_up is not None:
            g, u = self.gate_up(x).chunk(2, dim=-1)  # (t, I) each
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(self.act_fn(g) * u)

    def linears(self) -> dict[str, QuantLinear]:
        names = ("gate_up", "gate", "up", "down")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class QuantExperts(nn.Module):
    """Drop-in replacement for a fused experts module: ``forward(hidden (T, H), top_k_index, top_k_weights)``.

    Experts left unquantized (width 16) are :class:`DenseExpert` modules holding their original weights.
    """

    def __init__(self, experts: list[nn.Module], act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.act_fn = act_fn
        self._fused = None  # built on first use; False when the experts cannot be fused

    def as_expert_storage(self) -> QuantExpertStorage:
        """How the common expert interface sees this module (adapters call this instead of their fused storage)."""
        return QuantExpertStorage(self)

    def fused(self):
        """The layer's experts as one native call (:class:`mcmoe_vl.moe.fused.FusedMoE`) when every packed linear
        uses ``Kernel.SIMD`` and the experts are packed SiLU experts; else None (the eager loop below).

        Decided once and cached: :func:`set_kernel` and :func:`set_runtime` reset it (assigning ``kernel`` on a
        single linear by hand does not)."""
        if self._fused is None:
            from mcmoe_vl.moe.fused import FusedMoE

            simd = all(lin.kernel is Kernel.SIMD for e in self.experts
                       for lin in getattr(e, "linears", dict)().values())
            self._fused = (simd and FusedMoE.build(list(self.experts))) or False
        return self._fused or None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        fused = self.fused()
        if fused is not None and (y := fused(hidden_states, top_k_index, top_k_weights)) is not None:
            return y
        # The eager loop of transformers 5's fused experts, with each expert a module.
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            y = self.experts[e](hidden_states[tok])  # (n, H)
            y = y * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, y.to(final.dtype))
        return final


class DenseExpert(nn.Module):
    """An unquantized expert with the fused layout's arithmetic: ``gate_up`` (2I, H), ``down`` (H, I)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.gate_up = nn.Parameter(gate_up.detach().clone(), requires_grad=False)
        self.down = nn.Parameter(down.detach().clone(), requires_grad=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(self.act_fn(g) * u, self.down)


def set_runtime(model: nn.Module, runtime: Runtime) -> int:
    """Switch every :class:`QuantLinear` of ``model`` to ``runtime``; returns how many were switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_runtime(runtime)
            n += 1
        elif isinstance(m, QuantExperts):
            m._fused = None
    return n


def set_kernel(model: nn.Module, kernel: Kernel) -> int:
    """Use ``kernel`` in every :class:`QuantLinear` of ``model``; returns how many were switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = Kernel(kernel)
            n += 1
        elif isinstance(m, QuantExperts):
            m._fused = None
    return n


class QuantExpertStorage:
    """Expert storage of a quantized layer for the common expert interface (``mcmoe_vl.moe.ExpertStorage``).

    ``weights(i)`` dequantises expert i (model dtype), ``dense_expert(i)`` is the quantized expert module itself.
    An adapter returns it from ``expert_storage`` when the block's experts module is a :class:`QuantExperts`.
    """

    def __init__(self, experts: QuantExperts) -> None:
        if not isinstance(experts, QuantExperts):
            raise TypeError(f"expected QuantExperts, got {type(experts).__name__}")
        self.module = experts
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn

    def weights(self, i: int):
        from mcmoe_vl.moe.storage import ExpertWeights

        e = self.module.experts[i]
        if isinstance(e, DenseExpert):
            gate_up, down = e.gate_up, e.down
        else:
            gate_up = e.gate_up.weight() if e.gate_up is not None else torch.cat([e.gate.weight(), e.up.weight()])
            down = e.down.weight()
        n = gate_up.shape[0] // 2
        return ExpertWeights(gate=gate_up[:n], up=gate_up[n:], down=down)

    def dense_expert(self, i: int) -> nn.Module:
        return self.module.experts[i]

    def parameters(self) -> list[torch.Tensor]:
        return list(self.module.parameters()) + list(self.module.buffers())
