"""Fused MoE decode: one native call computes a MoE layer's routed and shared experts from packed storage.

For the tokens of one step, :class:`FusedMoE` hands the kernels (``csrc/mq_moe.c``) every kept (token, expert)
pair at once; the C side sorts the pairs by expert, computes each active expert's ``[gate; up]`` rows, the SiLU
product and the ``down`` rows at the expert's own width (one OpenMP loop over (expert, block of rows) per phase),
adds the shared experts (passed as experts every token selects with weight 1) and applies the routing weights.
No per-expert Python runs, and pruned pairs are never computed. With bfloat16 hidden states on a CPU with
AVX512-BF16 the products run on bfloat16 tokens (exact products, float32 sums) and the intermediate
``silu(gate) * up`` is rounded to bfloat16 before the down product, as a bfloat16 model computes it.

It plugs in behind the common expert interface: :func:`install_fused` sets ``MoELayer.fused`` on every layer whose
experts are all packed (:class:`~mcmoe_vl.quant.qlinear.QuantExpert`, or modules with ``gate_proj`` / ``up_proj``
/ ``down_proj`` :class:`~mcmoe_vl.quant.qlinear.QuantLinear`) with a SiLU activation; the layer's routing, its
override (ODP, OTP) and its observers run unchanged and only the expert computation is replaced. Layers it cannot
run (a 16-bit expert, another activation, the fake-quant runtime) keep the interface's own dispatch, and so does a
step in which some expert gets more than ``max_tokens`` tokens (prefill: there each packed linear dequantises once
and runs a dense GEMM, which is faster than the SIMD product beyond a few tokens). The result equals that dispatch on the same packed experts to float32 round-off.

    with ExpertInterface(model, adapter) as iface:
        install_fused(iface)            # returns the number of layers that run fused
        model.generate(...)
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mcmoe_vl.quant import kernels
from mcmoe_vl.quant.kernels import MqMat
from mcmoe_vl.quant.native import Isa
from mcmoe_vl.quant.qlinear import QuantExpert, QuantLinear, Runtime

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = kernels.DECODE_MAX_TOKENS  # per expert; beyond it dequantise + GEMM is faster (prefill)


class MqExpert(ctypes.Structure):
    """``mq_expert`` of ``csrc/mq_moe.c``."""

    _fields_ = [("gate_up", MqMat), ("up", MqMat), ("down", MqMat), ("split", ctypes.c_int32)]


def _is_silu(act) -> bool:
    return act is F.silu or isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _linears(module: nn.Module) -> tuple[list[QuantLinear], QuantLinear] | None:
    """([gate_up] or [gate, up], down) of a packed expert module, or None if it is not one."""
    if isinstance(module, QuantExpert):
        gu = [module.gate_up] if module.gate_up is not None else [module.gate, module.up]
        return gu, module.down
    names = ("gate_proj", "up_proj", "down_proj")
    if all(isinstance(getattr(module, n, None), QuantLinear) for n in names):
        return [module.gate_proj, module.up_proj], module.down_proj
    return None


def _usable(lin: QuantLinear) -> bool:
    return lin.bias is None and lin.runtime is Runtime.PACKED and kernels.supports(lin.packed)


def expert_struct(module: nn.Module) -> tuple[MqExpert, tuple] | None:
    """The ``mq_expert`` of a packed SiLU expert (and the tensors it points into), or None if unsupported."""
    parts = _linears(module)
    act = getattr(module, "act_fn", None)
    if parts is None or not _is_silu(act):
        return None
    gu, down = parts
    if not all(_usable(lin) for lin in (*gu, down)):
        return None
    hold = []
    mats = []
    for lin in (*gu, down):
        m, keep = kernels.mat(lin.packed)
        mats.append(m)
        hold.append(keep)
    st = MqExpert(mats[0], mats[1] if len(gu) == 2 else MqMat(), mats[-1], int(len(gu) == 2))
    return st, tuple(hold)


class FusedMoE:
    """The routed experts (and shared experts) of one MoE layer as one native call.

    ``experts``: the layer's expert modules in index order; ``shared``: shared-expert modules added to every token.
    Build with :meth:`build`, which returns None when some module is not a packed SiLU expert. ``max_tokens``: the
    most tokens one expert (a shared expert: every token) may get in a call; more and the call declines.
    """

    def __init__(self, structs: list[MqExpert], hold: list, num_routed: int, hidden: int,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.num_routed = num_routed
        self.num_shared = len(structs) - num_routed
        self.hidden = hidden
        self.max_tokens = max_tokens
        self._arr = (MqExpert * len(structs))(*structs)
        self._hold = hold  # the packed tensors the structs point into

    def __reduce__(self):
        # ctypes pointers do not survive a copy or pickle: the copy rebuilds its own on first use
        return (_not_built, ())

    @classmethod
    def build(cls, experts: Sequence[nn.Module], shared: Sequence[nn.Module] = (),
              max_tokens: int = DEFAULT_MAX_TOKENS) -> FusedMoE | None:
        if not kernels.available():
            return None
        structs, hold = [], []
        for m in (*experts, *shared):
            got = expert_struct(m)
            if got is None:
                return None
            structs.append(got[0])
            hold.append(got[1])
        hidden = structs[0].down.R
        if any(s.down.R != hidden or s.gate_up.C != hidden for s in structs):
            raise ValueError("experts of one layer must all map the same hidden size")
        return cls(structs, hold, len(experts), hidden, max_tokens)

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor,
                 keep: torch.Tensor | None = None, *, isa=None) -> torch.Tensor | None:
        """``sum_kept w * expert(x) + sum shared(x)`` (T, H) in ``x.dtype``; None (declined) when an expert would
        get more than ``max_tokens`` tokens."""
        T, k = topk_idx.shape
        if x.device.type != "cpu" or (self.num_shared and T > self.max_tokens):
            return None
        if T > self.max_tokens:
            kept = topk_idx if keep is None else topk_idx[keep.bool()]
            if torch.bincount(kept.reshape(-1), minlength=self.num_routed).max() > self.max_tokens:
                return None
        if x.shape != (T, self.hidden):
            raise ValueError(f"fused MoE: hidden states {tuple(x.shape)}, expected ({T}, {self.hidden})")
        idx, w = topk_idx.to(torch.int64), weights.to(torch.float32)
        kp = None if keep is None else keep.to(torch.uint8)
        if self.num_shared:
            sh = torch.arange(self.num_routed, self.num_routed + self.num_shared).expand(T, -1)
            idx = torch.cat([idx, sh], dim=1)
            w = torch.cat([w, torch.ones(T, self.num_shared)], dim=1)
            if kp is not None:
                kp = torch.cat([kp, torch.ones(T, self.num_shared, dtype=torch.uint8)], dim=1)
        idx, w = idx.contiguous(), w.contiguous()
        kp = None if kp is None else kp.contiguous()
        code = kernels.resolve_isa(isa)
        if x.dtype == torch.bfloat16 and code == -1:
            code = int(Isa.AVX512_BF16)  # bf16 tokens: AVX512-BF16 where the CPU has it, else the float32 paths
        elif code == Isa.AVX512_BF16 and x.dtype != torch.bfloat16:
            raise ValueError(f"the avx512_bf16 path takes bfloat16 tokens, got {x.dtype}")
        xf = x.to(torch.float32).contiguous()
        out = torch.zeros(T, self.hidden, dtype=torch.float32)
        lib = native_lib()
        rc = lib.mq_moe(self._arr, len(self._arr), xf.data_ptr(), T, idx.shape[1], idx.data_ptr(), w.data_ptr(),
                        None if kp is None else kp.data_ptr(), out.data_ptr(), code, torch.get_num_threads())
        if rc < 0:
            raise RuntimeError({-1: "the requested SIMD path is not supported by this CPU", -2: "out of memory",
                                -3: "an expert index is out of range"}.get(rc, f"error {rc}"))
        self.last_pairs = rc
        return out.to(x.dtype)


def _not_built() -> None:
    return None


def native_lib() -> ctypes.CDLL:
    lib = kernels._lib()
    if lib is None:
        raise RuntimeError("the native kernels are not built: run `python -m mcmoe_vl.quant.native build`")
    return lib


def fused_for_layer(layer, max_tokens: int = DEFAULT_MAX_TOKENS) -> FusedMoE | None:
    """A :class:`FusedMoE` for a :class:`~mcmoe_vl.moe.MoELayer`'s current experts, or None."""
    experts = [layer.expert(i) for i in range(layer.num_experts)]
    shared = [] if layer.shared_experts is None else [layer.shared_experts]
    return FusedMoE.build(experts, shared, max_tokens)


def install_fused(iface, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """Run every layer of ``iface`` that can be fused through one native call per step; returns how many."""
    n = 0
    for layer in iface.layers:
        layer.fused = fused_for_layer(layer, max_tokens)
        n += layer.fused is not None
    if n < len(iface.layers):
        log.info("fused MoE: %d of %d layers fused (the others have unpacked or non-SiLU experts, or the native "
                 "kernels are not built)", n, len(iface.layers))
    return n
