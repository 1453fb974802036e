"""Optional native CPU kernels for packed weights, compiled on first use with the system C compiler.

Two functions (source: ``kernels_src.c``), both reading the packed codes directly:

- :func:`dequantize_native`: the packed weight to float32, element for element the same values as
  :meth:`PackedTensor.dequantize` (``scale * (q - zero)`` in float32), one pass, multithreaded.
- :func:`lut_matmul`: ``y = x W^T`` for a few tokens without materialising ``W``: for each group of 128 columns a
  table ``tab[j][b]`` of the partial sums ``sum_bits x_k 2^bit`` for every value ``b`` of byte position ``j`` is
  built from the token, then every row needs one table lookup per *byte* of codes (32 lookups per group at 2 bits,
  48 at 3) and ``y_r = sum_g s_rg (sum_j tab[j][q_rj] - z_rg sum_{k in g} x_k)``. This reads 2-3 bits per weight
  instead of the 16 of a dense bf16 matrix-vector product; the result is float32 and differs from the dequantise-
  then-matmul path only by summation order.

The shared library is built with ``cc -O3 -march=native -fopenmp`` into ``$MCMOE_VL_CACHE`` (default
``~/.cache/mcmoe_vl/kernels``). If no compiler is available :func:`available` is False and the runtimes use the
torch implementation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .packed import PackedTensor

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("kernels_src.c")
_LIB: ctypes.CDLL | None = None
_FAILED = False


def _cache_dir() -> Path:
    return Path(os.environ.get("MCMOE_VL_CACHE", Path.home() / ".cache" / "mcmoe_vl")) / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL | None:
    src = _SRC.read_bytes()
    # -march=native: the binary is only valid for this CPU; key the cache by the source and the CPU's features
    tag = hashlib.sha256(src + platform.machine().encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = _cache_dir() / f"mq_{tag}.so"
    if not out.is_file():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            log.info("no C compiler: native packed kernels disabled")
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(_SRC), "-o", tmp, "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            log.warning("building native packed kernels failed (%s); using torch", res.stderr.strip()[:500])
            return None
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.mq_dequant.argtypes = [p, p, p, p] + [i] * 8
    lib.mq_lut_gemv.argtypes = [p, p, p, p, p] + [i] * 9
    return lib


def _lib() -> ctypes.CDLL | None:
    global _LIB, _FAILED
    if _LIB is None and not _FAILED:
        try:
            _LIB = _build()
        except OSError as exc:
            log.warning("loading native packed kernels failed (%s); using torch", exc)
        _FAILED = _LIB is None
    return _LIB


def available() -> bool:
    """True when the native kernels are compiled and loadable."""
    return _lib() is not None


def _check(p: PackedTensor) -> None:
    m = p.meta
    if len(m.shape) != 2:
        raise ValueError("native kernels take one 2-D packed matrix")
    if m.group_size % 8:
        raise ValueError(f"native kernels need a group size divisible by 8, got {m.group_size}")
    if p.scale.dtype != torch.float16 or (p.zero is not None and p.zero.dtype != torch.float16):
        raise ValueError("native kernels read float16 scales and zeros")


def _args(p: PackedTensor) -> tuple:
    zero = p.zero if p.zero is not None else p.scale  # unused at 1 bit
    return (p.qdata.contiguous(), p.scale.contiguous(), zero.contiguous())


def dequantize_native(p: PackedTensor) -> torch.Tensor:
    """(R, C) float32 weight in storage column order (apply ``p.perm`` yourself)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("native kernels are not available")
    _check(p)
    m = p.meta
    q, s, z = _args(p)
    out = torch.empty(m.rows, m.cols, dtype=torch.float32)
    lib.mq_dequant(q.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), m.rows, m.cols, m.groups,
                   m.group_size, m.bits, q.shape[-1], int(m.bits == 1), torch.get_num_threads())
    return out


def lut_matmul(x: torch.Tensor, p: PackedTensor) -> torch.Tensor:
    """``x W^T`` (..., R) float32 for ``x`` (..., C) in natural column order."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("native kernels are not available")
    _check(p)
    m = p.meta
    lead = x.shape[:-1]
    xf = x.reshape(-1, m.cols).float()
    if p.perm is not None:
        xf = xf[:, p.perm.long()]  # stored column k is natural column perm[k]
    xf = xf.contiguous()
    q, s, z = _args(p)
    y = torch.empty(xf.shape[0], m.rows, dtype=torch.float32)
    lib.mq_lut_gemv(q.data_ptr(), s.data_ptr(), z.data_ptr(), xf.data_ptr(), y.data_ptr(), xf.shape[0], m.rows,
                    m.cols, m.groups, m.group_size, m.bits, q.shape[-1], int(m.bits == 1), torch.get_num_threads())
    return y.reshape(*lead, m.rows)
