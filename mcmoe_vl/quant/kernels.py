"""Native CPU kernels for packed weights (C sources in ``csrc/``, built by ``python -m mcmoe_vl.quant.native build``).

- :func:`packed_matmul`: ``y = x W^T`` for any number of tokens straight from the packed codes (up to 8 tokens
  share each decoded block; it beats a dense bf16 GEMM only for decode-sized batches, see ``DECODE_MAX_TOKENS``).
  Per (row, group) ``s * sum_k q_k x_k - s z sum_k x_k`` in float32;
  the codes are decoded into SIMD lanes (AVX-512 or AVX2, chosen at run time, or a portable scalar loop; bfloat16
  tokens on AVX512-BF16: codes looked up as bfloat16 integers and multiplied by ``vdpbf16ps``) and multiplied with
  the token, which is arranged once per call into the lanes' column order. It reads 1-4 bits per
  weight and agrees with the dequantise-then-matmul product to float32 round-off (not bitwise: summation order).
  At 1 bit with whole groups of a multiple of 128 columns, one or two tokens on AVX-512 (float32 or bfloat16)
  run a table lookup instead (``csrc/mq_lut1.c``): per token the 16 partial sums of every 4 columns, one
  ``vpermps`` per 16 rows x 4 columns (:func:`set_lut1` switches it off, for comparisons).
- :func:`blocked_matmul`: bfloat16 tokens on AVX512-BF16, a few to a few dozen: tiles of 4 rows x 4 tokens with
  the weights dequantised in registers by a per-(row, group) bfloat16 table lookup, ``vdpbf16ps`` products.
- :func:`panel_matmul`: bfloat16 tokens on AVX512-BF16, prefill: a blocked GEMM over weight panels dequantised
  once into an L2-resident buffer, a 12-row x 32-token register micro-kernel.
- :func:`cpu_matmul`: what ``Kernel.SIMD`` runs on the CPU: :func:`packed_matmul` up to ``DECODE_MAX_TOKENS``
  tokens (``DECODE_MAX_TOKENS_BF16`` for bfloat16 tokens on AVX512-BF16), then for bfloat16 tokens on
  AVX512-BF16 :func:`blocked_matmul` up to ``BLOCKED_MAX_TOKENS`` and :func:`panel_matmul` beyond; otherwise
  (float32 tokens, or shapes those do not take) :func:`prefill_matmul`: the weight
  dequantised once, by the SIMD path, into a reused buffer in the path's column order (the token is arranged to
  match), block of rows by block, each block one dense ``F.linear``.
- :func:`dequantize_native`: the packed weight to float32, element for element the values of
  :meth:`PackedTensor.dequantize` (``scale * (q - zero)`` in float32).
- :func:`lut_matmul`: the earlier scalar table-lookup product (256-entry tables of partial sums per byte).

:func:`available` is False when the library is not built (logged once by :mod:`mcmoe_vl.quant.native`); the
runtimes then use the torch path.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import native
from .native import Isa
from .packed import PackedTensor


class MqMat(ctypes.Structure):
    """``mq_mat`` of ``csrc/mq.h``: one packed matrix as the kernels read it."""

    _fields_ = [("q", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("zr", ctypes.c_void_p), ("perm", ctypes.c_void_p),
                ("R", ctypes.c_int32), ("C", ctypes.c_int32), ("gs", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("row_bytes", ctypes.c_int32)]


def _lib() -> ctypes.CDLL | None:
    return native.load()


def available() -> bool:
    """True when the native kernels are built and loadable."""
    return _lib() is not None


def supports(p: PackedTensor) -> bool:
    """Whether the native kernels read ``p`` (one 2-D matrix with float16 scales and zeros)."""
    return (len(p.meta.shape) == 2 and p.scale.dtype == torch.float16
            and (p.zero is None or p.zero.dtype == torch.float16))


def set_lut1(enabled: bool) -> bool:
    """Switch the 1-bit table-lookup decode kernel on or off (process-wide); returns the previous setting.

    Off, 1-bit decode runs the bit-plane (float32 tokens) or bf16 dot-product kernels like the other widths. The
    kernel exists on x86 builds only; elsewhere this returns False and changes nothing.
    """
    lib = _need_lib()
    try:
        flag = ctypes.c_int.in_dll(lib, "mq_lut1_on")
    except ValueError:
        return False
    old = bool(flag.value)
    flag.value = int(bool(enabled))
    return old


def _check(p: PackedTensor) -> None:
    if len(p.meta.shape) != 2:
        raise ValueError(f"native kernels take one 2-D packed matrix, got shape {p.meta.shape}")
    if not supports(p):
        raise ValueError(f"native kernels read float16 scales and zeros, got {p.scale.dtype}")


def mat(p: PackedTensor) -> tuple[MqMat, tuple[torch.Tensor, ...]]:
    """The ``mq_mat`` of ``p`` and the tensors it points into (keep them alive while the struct is used)."""
    _check(p)
    m = p.meta
    keep = tuple(t.contiguous() for t in (p.qdata, p.scale, p.zero, p.perm) if t is not None)
    q, s = keep[0], keep[1]
    z = keep[2] if p.zero is not None else None
    perm = keep[-1] if p.perm is not None else None
    st = MqMat(q.data_ptr(), s.data_ptr(), None if z is None else z.data_ptr(),
               None if perm is None else perm.data_ptr(), m.rows, m.cols, m.group_size, m.bits, q.shape[-1])
    return st, keep


def resolve_isa(isa: Isa | str | None) -> int:
    """``isa`` (or ``MCMOE_VL_ISA``) as the library's code; -1 = the best this CPU runs."""
    if isa is None:
        isa = native.forced_isa()
    if isa is None:
        return -1
    if isinstance(isa, str):
        try:
            isa = Isa[isa.upper()]
        except KeyError:
            raise ValueError(f"unknown SIMD path {isa!r}; valid: {[i.name.lower() for i in Isa]}") from None
    return int(isa)


def _need_lib() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError("the native kernels are not built: run `python -m mcmoe_vl.quant.native build`")
    return lib


def packed_matmul(x: torch.Tensor, p: PackedTensor, *, isa: Isa | str | None = None,
                  return_isa: bool = False) -> torch.Tensor | tuple[torch.Tensor, Isa]:
    """``x W^T`` (..., R) float32 for ``x`` (..., C) in natural column order, from the packed codes.

    ``isa`` forces a SIMD path (``scalar``, ``avx2``, ``avx512``; default: ``MCMOE_VL_ISA`` or the best the CPU
    has). A path whose block does not divide the group size runs the next narrower one; ``return_isa=True`` also
    returns the path that ran.
    """
    lib = _need_lib()
    st, keep = mat(p)
    m = p.meta
    if x.shape[-1] != m.cols:
        raise ValueError(f"input has {x.shape[-1]} features, the packed weight {m.cols} columns")
    lead = x.shape[:-1]
    code = resolve_isa(isa)
    if x.dtype == torch.bfloat16 and code in (-1, Isa.AVX512_BF16) and x.numel():
        xb = x.reshape(-1, m.cols).contiguous()
        y = torch.empty(xb.shape[0], m.rows, dtype=torch.float32)
        rc = lib.mq_gemm_bf16(ctypes.byref(st), xb.data_ptr(), xb.shape[0], y.data_ptr(), m.rows,
                              torch.get_num_threads())
        if rc == 0:
            del keep
            y = y.reshape(*lead, m.rows)
            return (y, Isa.AVX512_BF16) if return_isa else y
        if rc == -2:
            raise MemoryError("native packed product: out of memory")
        if code == Isa.AVX512_BF16:
            raise RuntimeError("the avx512_bf16 path needs a CPU with AVX512-BF16 and a group size divisible by its "
                               f"block (64 columns at 4 bits, 128 otherwise); got {m.group_size}"
                               if rc == -4 else "this CPU has no AVX512-BF16")
        code = -1  # no AVX512-BF16, or a group size it does not take: the float32 paths
    elif code == Isa.AVX512_BF16:
        raise ValueError(f"the avx512_bf16 path takes bfloat16 tokens, got {x.dtype}")
    xf = x.reshape(-1, m.cols).to(torch.float32).contiguous()
    y = torch.empty(xf.shape[0], m.rows, dtype=torch.float32)
    if xf.shape[0] == 0:
        return (y.reshape(*lead, m.rows), Isa(lib_resolve(st, isa))) if return_isa else y.reshape(*lead, m.rows)
    used = lib.mq_gemm(ctypes.byref(st), xf.data_ptr(), xf.shape[0], y.data_ptr(), m.rows, code,
                       torch.get_num_threads())
    if used == -1:
        raise RuntimeError(f"SIMD path {Isa(code).name.lower()} is not supported by this CPU "
                           f"(it runs {Isa(lib.mq_cpu_isa()).name.lower()})")
    if used < 0:
        raise MemoryError("native packed product: out of memory")
    del keep
    y = y.reshape(*lead, m.rows)
    return (y, Isa(used)) if return_isa else y


# Up to this many tokens the packed SIMD product beats dequantise + dense GEMM. Measured (benchmarks/
# bench_kernels.py, 14336 x 4096, one thread, CPU time, against bf16 F.linear): float32 tokens 0.3x at 1 token,
# 0.7x at 2, 1.3-2x at 4; bf16 tokens on AVX512-BF16 0.15-0.24x at 1 (2026-12-02), 0.5x at 2, 0.8-1.1x at 4, 1.4x at 8.
DECODE_MAX_TOKENS = 2
DECODE_MAX_TOKENS_BF16 = 2
# bfloat16 tokens on AVX512-BF16 above DECODE_MAX_TOKENS_BF16: the register-blocked product (blocked_matmul) up to
# BLOCKED_MAX_TOKENS tokens (BLOCKED_MAX_TOKENS_SMALL for matrices under PANEL_SMALL weights), the panel GEMM
# (panel_matmul) above. Measured 2026-12-02 (one thread, 2 bits, ratio to bf16 F.linear in the same run, medians
# of 9; panel / blocked): 14336 x 4096 at 4 / 8 / 12 / 16 / 24 / 32 / 64 tokens 0.83 / 0.72 / 0.84 / 0.92 / 0.92 /
# 0.90 / 0.95x against 0.32 / 0.49 / 0.67 / 0.75 / 0.98 / 1.04 / 1.26x (4096 x 14336 alike); DeepSeek-VL2-tiny's
# expert matrices 1792 x 1280 and 1280 x 896 at 8 / 12 / 16 / 24 tokens 1.02 / 1.00 / 1.09 / 0.98x and 0.93 / 1.05 /
# 1.04 / 1.00x against 0.94 / 1.09 / 1.23 / 1.44x and 0.90 / 1.41 / 1.46 / 1.70x. Where neither runs (no
# AVX512-BF16, float32 tokens, or columns / group size not multiples of 128), prefill_matmul.
BLOCKED_MAX_TOKENS = 16
BLOCKED_MAX_TOKENS_SMALL = 8
PANEL_SMALL = 1 << 22
# Where the panel GEMM cannot run (columns not a multiple of 128), the blocked product up to this many tokens, then
# dequantise + GEMM (measured earlier: blocked 1.09x / dequantise + GEMM 1.46x at 32 tokens, 1.33x / 1.10x at 128).
BLOCKED_FALLBACK_MAX_TOKENS = 64

_SCRATCH: dict[torch.dtype, torch.Tensor] = {}


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of at least ``n`` elements (one per dtype: prefill dequantises one matrix at a time)."""
    buf = _SCRATCH.get(dtype)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]


def dequantize_arranged(p: PackedTensor, dtype: torch.dtype = torch.bfloat16, *, isa: Isa | str | None = None,
                        rows: tuple[int, int] | None = None, out: torch.Tensor | None = None,
                        _st: tuple | None = None) -> tuple[torch.Tensor, Isa]:
    """Rows ``rows`` (default all) of the weight (float32 or bfloat16, the values of
    :meth:`PackedTensor.dequantize`) with the columns in the SIMD path's arranged order, into ``out`` (default: the
    reused buffer, valid until the next call)."""
    lib = _need_lib()
    st, keep = _st or mat(p)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize_arranged writes float32 or bfloat16, not {dtype}")
    m = p.meta
    r0, r1 = rows or (0, m.rows)
    w = (out if out is not None else _scratch((r1 - r0) * m.cols, dtype)).view(r1 - r0, m.cols)
    used = lib.mq_dequant_arranged(ctypes.byref(st), w.data_ptr(), int(dtype == torch.bfloat16), resolve_isa(isa),
                                   r0, r1, torch.get_num_threads())
    if used == -3:
        raise ValueError(f"rows {rows} out of range for a weight of {m.rows} rows")
    if used < 0:
        raise RuntimeError(f"SIMD path {isa} is not supported by this CPU")
    del keep
    return w, Isa(used)


def arrange(x: torch.Tensor, p: PackedTensor, isa: Isa) -> torch.Tensor:
    """(T, C) float32 token rows in the column order of :func:`dequantize_arranged` for ``isa``."""
    lib = _need_lib()
    st, keep = mat(p)
    xf = x.reshape(-1, p.meta.cols).to(torch.float32).contiguous()
    out = torch.empty_like(xf)
    lib.mq_arrange(ctypes.byref(st), int(isa), xf.data_ptr(), xf.shape[0], out.data_ptr())
    del keep
    return out


# Prefill dequantises this many weights at a time (32 MiB of bf16), then one GEMM per block: large GEMMs run closer
# to the CPU's peak than cache-sized ones (4096 x 4096 at 128 tokens, against dense bf16 in the same run: 1.25x with
# blocks of 2^20 weights, 1.13x with 2^22, 1.07x with 2^24).
PREFILL_BLOCK = 1 << 24


def prefill_matmul(x: torch.Tensor, p: PackedTensor) -> torch.Tensor:
    """``x W^T`` (..., R) in ``x.dtype`` (bfloat16 / float32): the weight dequantised once, block of rows by block
    into the reused buffer, each block multiplied by the arranged tokens with one GEMM."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    m = p.meta
    st = mat(p)
    rb = max(16, PREFILL_BLOCK // m.cols // 16 * 16)
    isa = Isa(lib_resolve(st[0]))
    xa = arrange(x, p, isa).to(dtype)
    y = torch.empty(xa.shape[0], m.rows, dtype=dtype)
    for r0 in range(0, m.rows, rb):
        r1 = min(r0 + rb, m.rows)
        w, _ = dequantize_arranged(p, dtype, isa=isa, rows=(r0, r1), _st=st)
        y[:, r0:r1] = F.linear(xa, w)
    return y.reshape(*x.shape[:-1], m.rows)


def panel_ok(x: torch.Tensor, p: PackedTensor) -> bool:
    """Whether :func:`panel_matmul` runs ``x`` and ``p``: bfloat16 tokens, a CPU with AVX512-BF16, and the columns
    and the group size multiples of 128."""
    lib = _lib()
    return (lib is not None and x.dtype == torch.bfloat16 and bool(lib.mq_cpu_bf16())
            and p.meta.cols % 128 == 0 and p.meta.group_size % 128 == 0)


def panel_matmul(x: torch.Tensor, p: PackedTensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x bf16(W)^T`` (..., R) in ``out_dtype`` (float32: the sums unrounded) for bfloat16 ``x`` (prefill,
    AVX512-BF16): a blocked GEMM whose weight panels (128 rows x 2048 columns) are dequantised once into an
    L2-resident buffer, with a 12-row x 32-token register micro-kernel, the tokens in the vector lanes
    (``csrc/mq_panel_bf16.c``). The weights are the values of :meth:`PackedTensor.dequantize` rounded to bfloat16,
    the sums float32 (summation order aside, what ``F.linear`` on the dequantised bf16 weight computes), the result
    rounded to ``out_dtype`` once."""
    if not panel_ok(x, p):
        raise ValueError("panel_matmul needs bfloat16 tokens, a CPU with AVX512-BF16 and columns and group size "
                         f"multiples of 128; got {x.dtype}, {p.meta.cols} columns, group {p.meta.group_size}")
    lib = _need_lib()
    st, keep = mat(p)
    m = p.meta
    xb = x.reshape(-1, m.cols).contiguous()
    bf16 = out_dtype == torch.bfloat16
    y = torch.empty(xb.shape[0], m.rows, dtype=torch.bfloat16 if bf16 else torch.float32)
    rc = lib.mq_panel_gemm(ctypes.byref(st), xb.data_ptr(), xb.shape[0], y.data_ptr(), m.rows, int(bf16),
                           torch.get_num_threads())
    del keep
    if rc == -2:
        raise MemoryError("panel_matmul: out of memory")
    if rc < 0:
        raise RuntimeError(f"panel_matmul: the kernel refused the product (code {rc}); it was built without "
                           "AVX512-BF16 support")
    return y.to(out_dtype).reshape(*x.shape[:-1], m.rows)  # no copy for bfloat16 and float32


def lib_resolve(st: MqMat, isa: Isa | str | None = None) -> int:
    """The path the kernels run for this matrix (``isa`` or ``MCMOE_VL_ISA`` or the CPU's best, lowered while its
    block does not divide the group size)."""
    used = _need_lib().mq_resolve_isa(ctypes.byref(st), resolve_isa(isa))
    if used < 0:
        raise RuntimeError(f"SIMD path {isa} is not supported by this CPU")
    return used


def blocked_matmul(x: torch.Tensor, p: PackedTensor) -> torch.Tensor:
    """``x bf16(W)^T`` (..., R) float32 for bfloat16 ``x`` on AVX512-BF16: tiles of 4 rows x 4 tokens, each
    (row, group) dequantised by a 32-entry bfloat16 table lookup into registers and multiplied with ``vdpbf16ps``
    (``csrc/mq_avx512bf16.c``); no weight goes through memory. Raises when the CPU has no AVX512-BF16 or the
    group size is not a multiple of the path's block (128 columns; 64 at 4 bits)."""
    lib = _need_lib()
    st, keep = mat(p)
    m = p.meta
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the blocked product takes bfloat16 tokens, got {x.dtype}")
    if x.shape[-1] != m.cols:
        raise ValueError(f"input has {x.shape[-1]} features, the packed weight {m.cols} columns")
    xb = x.reshape(-1, m.cols).contiguous()
    y = torch.empty(xb.shape[0], m.rows, dtype=torch.float32)
    if xb.shape[0]:
        rc = lib.mq_prefill_bf16(ctypes.byref(st), xb.data_ptr(), xb.shape[0], y.data_ptr(), m.rows,
                                 torch.get_num_threads())
        if rc == -2:
            raise MemoryError("native packed product: out of memory")
        if rc < 0:
            raise RuntimeError("the blocked product needs a CPU with AVX512-BF16 and a group size divisible by 128 "
                               f"(64 at 4 bits); got group {m.group_size}" if rc == -4 else
                               "this CPU has no AVX512-BF16")
    del keep
    return y.reshape(*x.shape[:-1], m.rows)


def _blocked_ok(x: torch.Tensor, p: PackedTensor) -> bool:
    return (x.dtype == torch.bfloat16 and bool(_lib().mq_cpu_bf16())
            and p.meta.group_size % (64 if p.meta.bits == 4 else 128) == 0)


def cpu_matmul(x: torch.Tensor, p: PackedTensor) -> torch.Tensor:
    """``x W^T`` from packed storage: the SIMD product for decode-sized batches; for bfloat16 tokens on
    AVX512-BF16 the register-blocked product up to ``BLOCKED_MAX_TOKENS`` (``BLOCKED_MAX_TOKENS_SMALL`` for small
    matrices), the panel GEMM beyond; otherwise dequantise + GEMM."""
    n = x.numel() // p.meta.cols
    blocked = _blocked_ok(x, p)
    if n <= (DECODE_MAX_TOKENS_BF16 if blocked else DECODE_MAX_TOKENS):
        return packed_matmul(x, p)
    small = p.meta.rows * p.meta.cols < PANEL_SMALL
    if blocked and n <= (BLOCKED_MAX_TOKENS_SMALL if small else BLOCKED_MAX_TOKENS):
        return blocked_matmul(x, p)
    if panel_ok(x, p):
        return panel_matmul(x, p)
    if blocked and n <= BLOCKED_FALLBACK_MAX_TOKENS:  # columns not a multiple of 128: no panel GEMM
        return blocked_matmul(x, p)
    return prefill_matmul(x, p)


def dequantize_native(p: PackedTensor) -> torch.Tensor:
    """(R, C) float32 weight in storage column order (apply ``p.perm`` yourself)."""
    lib = _need_lib()
    _check(p)
    m = p.meta
    zero = p.zero if p.zero is not None else p.scale  # unused at 1 bit
    q, s, z = p.qdata.contiguous(), p.scale.contiguous(), zero.contiguous()
    out = torch.empty(m.rows, m.cols, dtype=torch.float32)
    lib.mq_dequant(q.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), m.rows, m.cols, m.groups,
                   m.group_size, m.bits, q.shape[-1], int(m.bits == 1), torch.get_num_threads())
    return out


def lut_matmul(x: torch.Tensor, p: PackedTensor) -> torch.Tensor:
    """``x W^T`` (..., R) float32 by scalar table lookup (group size divisible by 8)."""
    lib = _need_lib()
    _check(p)
    m = p.meta
    if m.group_size % 8:
        raise ValueError(f"the table-lookup kernel needs a group size divisible by 8, got {m.group_size}")
    lead = x.shape[:-1]
    xf = x.reshape(-1, m.cols).float()
    if p.perm is not None:
        xf = xf[:, p.perm.long()]  # stored column k is natural column perm[k]
    xf = xf.contiguous()
    zero = p.zero if p.zero is not None else p.scale
    q, s, z = p.qdata.contiguous(), p.scale.contiguous(), zero.contiguous()
    y = torch.empty(xf.shape[0], m.rows, dtype=torch.float32)
    lib.mq_lut_gemv(q.data_ptr(), s.data_ptr(), z.data_ptr(), xf.data_ptr(), y.data_ptr(), xf.shape[0], m.rows,
                    m.cols, m.groups, m.group_size, m.bits, q.shape[-1], int(m.bits == 1), torch.get_num_threads())
    return y.reshape(*lead, m.rows)
