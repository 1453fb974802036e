"""Build and load the native packed-weight kernels (C sources in ``csrc/``).

Build once, by a command (the project's setup script calls it)::

    python -m mcmoe_vl.quant.native build        # compile into mcmoe_vl/quant/_native/ (gitignored)
    python -m mcmoe_vl.quant.native info         # what is built, which SIMD paths this CPU runs

The library is a plain shared object loaded with :mod:`ctypes`. Every SIMD path is its own object compiled with
its own ISA flags (``-mavx2 -mfma -mf16c``; ``-mavx512f -mavx512bw -mf16c``; the same plus ``-mavx512bf16``), never
``-march=native``, so one build runs on any x86-64 CPU: the path is chosen at run time with
``__builtin_cpu_supports`` (``mq_cpu_isa``, ``mq_cpu_bf16``). OpenMP threads are
set per call from ``torch.get_num_threads()``; torch ships the same libgomp, so the two share one thread pool.

Next to the library, ``build.json`` holds the SHA-256 of the sources and flags it was built from. :func:`load`
refuses a library whose fingerprint does not match the current sources (rebuild), and when there is no library
(no compiler at setup, or never built) it logs once and returns None: callers then run the torch path.
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mcmoe_vl.io import atomic_path, read_json, write_json_atomic

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
BUILD_DIR = Path(__file__).with_name("_native")
LIB_NAME = "libmcmoe_vl_kernels.so"
_BASE = ["-O3", "-fPIC", "-fopenmp", "-std=gnu11", "-Wall"]
# source -> extra flags (x86 ISA objects are compiled only on x86)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
SOURCES: dict[str, list[str]] = {
    "mq_scalar.c": [],
    "mq_gemm.c": [],
    "mq_moe.c": [],
    "mq_dequant_lut.c": [],
    **({"mq_avx2.c": ["-mavx2", "-mfma", "-mf16c"], "mq_avx512.c": ["-mavx512f", "-mavx512bw", "-mf16c"],
        "mq_lut1.c": ["-mavx512f", "-mavx512bw", "-mf16c"],
        "mq_avx512bf16.c": ["-mavx512f", "-mavx512bw", "-mavx512bf16", "-mf16c"],
        "mq_panel_bf16.c": ["-mavx512f", "-mavx512bw", "-mavx512bf16", "-mf16c"]} if _X86 else {}),
}
# a source the compiler may not know how to build (an older gcc / clang) -> its stand-in
OPTIONAL = {"mq_avx512bf16.c": "mq_nobf16.c", "mq_panel_bf16.c": "mq_nopanel.c"}
if not _X86:
    SOURCES["mq_nobf16.c"] = []
    SOURCES["mq_nopanel.c"] = []


class Isa(int, enum.Enum):
    """The SIMD path a kernel runs (``MCMOE_VL_ISA`` = scalar / avx2 / avx512 / avx512_bf16 forces one for a process).

    ``AVX512_BF16`` runs only for bfloat16 tokens (it needs them to be exact); it is the default for them on CPUs
    with AVX512-BF16. Forcing another path for bfloat16 tokens converts them to float32 first.
    """

    SCALAR = 0
    AVX2 = 1
    AVX512 = 2
    AVX512_BF16 = 3


def fingerprint() -> str:
    """SHA-256 over every source, header and the compile flags."""
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".c", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(json.dumps(SOURCES, sort_keys=True).encode() + " ".join(_BASE).encode())
    return h.hexdigest()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)  # None when CC names no executable
    return shutil.which("cc") or shutil.which("gcc")


def build(out_dir: Path | str | None = None) -> Path:
    """Compile the kernels into ``out_dir`` (default ``mcmoe_vl/quant/_native``); returns the library's path.

    Raises RuntimeError with the compiler's message when there is no compiler or a source does not compile.
    """
    out_dir = Path(out_dir) if out_dir is not None else BUILD_DIR
    if (cc := _compiler()) is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', '')!r}, cc, gcc); install one or set CC. "
                           "Without the kernels the torch path is used")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        objs, used = [], {}
        for src, flags in SOURCES.items():
            obj = Path(tmp) / (src + ".o")
            try:
                _run([cc, *_BASE, *flags, "-c", str(CSRC / src), "-o", str(obj)])
            except RuntimeError as exc:
                if src not in OPTIONAL:
                    raise
                log.warning("%s does not compile here (%s); building without that path", src,
                            str(exc).splitlines()[-1][:200])
                src, flags = OPTIONAL[src], []
                obj = Path(tmp) / (src + ".o")
                _run([cc, *_BASE, "-c", str(CSRC / src), "-o", str(obj)])
            objs.append(str(obj))
            used[src] = flags
        lib = out_dir / LIB_NAME
        with atomic_path(lib) as tmp_lib:
            _run([cc, "-shared", "-fopenmp", *objs, "-o", str(tmp_lib), "-lm"])
    write_json_atomic(out_dir / "build.json", {"fingerprint": fingerprint(), "compiler": cc,
                                               "sources": used, "flags": _BASE})
    return lib


def _run(cmd: list[str]) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise RuntimeError(f"compiling the native kernels failed: {' '.join(cmd)}: {exc}") from exc
    if res.returncode != 0:
        raise RuntimeError(f"compiling the native kernels failed: {' '.join(cmd)}\n{res.stderr.strip()[:2000]}")


_LIB: ctypes.CDLL | None = None
_TRIED = False


def load(lib_dir: Path | str | None = None) -> ctypes.CDLL | None:
    """The loaded library, or None (logged once) when it is not built or is stale."""
    global _LIB, _TRIED
    if lib_dir is None and _TRIED:
        return _LIB
    d = Path(lib_dir) if lib_dir is not None else Path(os.environ.get("MCMOE_VL_NATIVE_DIR", BUILD_DIR))
    lib = _open(d)
    if lib_dir is None:
        _LIB, _TRIED = lib, True
    return lib


def use(lib_dir: Path | str) -> ctypes.CDLL | None:
    """Load the library from ``lib_dir`` for this process (tests build into a temporary directory)."""
    global _LIB, _TRIED
    _LIB, _TRIED = _open(Path(lib_dir)), True
    return _LIB


def _open(d: Path) -> ctypes.CDLL | None:
    path, meta = d / LIB_NAME, d / "build.json"
    if not path.is_file() or not meta.is_file():
        log.info("native packed kernels are not built (run `%s -m mcmoe_vl.quant.native build`); using torch",
                 Path(sys.executable).name)
        return None
    if read_json(meta, what="native build record").get("fingerprint") != fingerprint():
        log.warning("native packed kernels in %s were built from other sources; rebuild with `python -m "
                    "mcmoe_vl.quant.native build`. Using torch", d)
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.warning("loading native packed kernels failed (%s); using torch", exc)
        return None
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.mq_cpu_isa.restype = i
    lib.mq_cpu_isa.argtypes = []
    lib.mq_gemm.restype = i
    lib.mq_gemm.argtypes = [p, p, i, p, i, i, i]
    lib.mq_moe.restype = i
    lib.mq_moe.argtypes = [p, i, p, i, i, p, p, p, p, i, i]
    lib.mq_cpu_bf16.restype = i
    lib.mq_cpu_bf16.argtypes = []
    lib.mq_gemm_bf16.restype = i
    lib.mq_gemm_bf16.argtypes = [p, p, i, p, i, i]
    lib.mq_panel_gemm.restype = i
    lib.mq_panel_gemm.argtypes = [p, p, i, p, i, i, i]
    lib.mq_prefill_bf16.restype = i
    lib.mq_prefill_bf16.argtypes = [p, p, i, p, i, i]
    lib.mq_dequant_arranged.restype = i
    lib.mq_dequant_arranged.argtypes = [p, p, i, i, i, i, i]
    lib.mq_arrange.argtypes = [p, i, p, i, p]
    lib.mq_resolve_isa.restype = i
    lib.mq_resolve_isa.argtypes = [p, i]
    lib.mq_block.restype = i
    lib.mq_block.argtypes = [i, i]
    lib.mq_dequant.argtypes = [p, p, p, p] + [i] * 8
    lib.mq_lut_gemv.argtypes = [p, p, p, p, p] + [i] * 9


def cpu_isa() -> Isa | None:
    """The best SIMD path this CPU runs (None without the library)."""
    lib = load()
    return None if lib is None else Isa(lib.mq_cpu_isa())


def forced_isa() -> Isa | None:
    """The path forced by ``MCMOE_VL_ISA`` (scalar, avx2, avx512), or None."""
    name = os.environ.get("MCMOE_VL_ISA", "").strip().lower()
    if not name:
        return None
    try:
        return Isa[name.upper()]
    except KeyError:
        raise ValueError(f"MCMOE_VL_ISA={name!r}: valid values are {[i.name.lower() for i in Isa]}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mcmoe_vl.quant.native", description="native packed kernels")
    ap.add_argument("command", choices=["build", "info"])
    ap.add_argument("--out", default=None, help=f"output directory (default {BUILD_DIR})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        try:
            lib = build(args.out)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"built {lib}")
    lib = load(args.out)
    if lib is None:
        print("native kernels: not available")
        return 1 if args.command == "build" else 0
    print(f"native kernels: {Path(args.out or BUILD_DIR) / LIB_NAME}; this CPU runs {Isa(lib.mq_cpu_isa()).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
