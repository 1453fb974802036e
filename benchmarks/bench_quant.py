"""Quantization engine benchmarks: GPTQ time per expert matrix, and packed CPU matmul against dense bf16.

    .venv/bin/python benchmarks/bench_quant.py [--threads 2] [--quick]

1. GPTQ (2-bit, group 128, blocks of 128, float32) per expert matrix at DeepSeek-VL2-small size (1408 x 2048) and
   Mixtral size (14336 x 4096), against the textbook float64 loop of ``mcmoe_vl.quant.reference`` in the same
   run. At Mixtral size the textbook loop is timed on a 1024-row slice (its cost per column is the O(C^2) inverse
   downdate plus O(R C) for the rows), and the blocked core is timed on the same slice for the ratio.
2. ``y = x W^T`` for W of 14336 x 4096, 1 and 128 tokens, 2 and 3 bits: dense bf16 ``F.linear``; the packed
   runtime's exact path (native dequantisation to bf16, then ``F.linear``; bit-identical to fake-quant); the
   table-lookup path from the packed codes (``Kernel.LUT``). Medians of repeated runs; ratios are to dense bf16
   measured in the same run (the CPU is shared, so absolute times drift).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from mcmoe_vl.quant import kernels
from mcmoe_vl.quant.gptq import gptq_quantize, hessian_from_inputs, prepare_inverse, rtn_quantize
from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.qlinear import Kernel, QuantLinear
from mcmoe_vl.quant.quantizer import get_quantizer
from mcmoe_vl.quant.reference import reference_gptq


def timed(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def inputs(c: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.tril(torch.randn(c, c, generator=g)) / math.sqrt(c) + torch.eye(c)
    return torch.randn(n, c, generator=g) @ L.t()


def bench_gptq(quick: bool) -> list[tuple]:
    rows = []
    shapes = [("DeepSeek-VL2-small expert", 1408, 2048, None), ("Mixtral expert", 14336, 4096, 1024)]
    if quick:
        shapes = [("small", 256, 512, None), ("slice test", 1024, 1024, 128)]
    q = get_quantizer(2)
    for name, r, c, ref_rows in shapes:
        w = torch.randn(r, c) * 0.02
        h = hessian_from_inputs(inputs(c, 2 * c))
        t0 = time.perf_counter()
        inv = prepare_inverse(h)
        t_inv = time.perf_counter() - t0
        t0 = time.perf_counter()
        gptq_quantize(w, inv, q)
        t_ours = time.perf_counter() - t0
        rr = ref_rows or r
        t0 = time.perf_counter()
        gptq_quantize(w[:rr], inv, q)
        t_ours_slice = time.perf_counter() - t0 + t_inv
        t0 = time.perf_counter()
        reference_gptq(w[:rr], h, q)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        rtn_quantize(w, q)
        t_rtn = time.perf_counter() - t0
        rows.append((name, f"{r} x {c}", t_inv + t_ours, t_rtn, rr, t_ref, t_ref / t_ours_slice))
    return rows


def bench_matmul(quick: bool) -> list[tuple]:
    r, c = (2048, 1024) if quick else (14336, 4096)
    rows = []
    w = torch.randn(r, c) * 0.02
    dense = w.bfloat16()
    for bits in (2, 3):
        p = PackedTensor.from_result(rtn_quantize(w, get_quantizer(bits)))
        exact = QuantLinear(p, dtype=torch.bfloat16, kernel=Kernel.AUTO)
        lut = QuantLinear(p, dtype=torch.bfloat16, kernel=Kernel.LUT)
        for t in (1, 128):
            x = torch.randn(t, c).bfloat16()
            rep = 9 if t == 1 else 3
            t_dense = timed(lambda: F.linear(x, dense), rep)
            t_exact = timed(lambda: exact(x), rep)
            t_lut = timed(lambda: lut(x), rep) if t <= 4 else None
            rows.append((bits, t, f"{r} x {c}", t_dense, t_exact, t_lut, p.nbytes, dense.numel() * 2))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native kernels: {kernels.available()}\n")
    print("| matrix | shape | GPTQ 2-bit (ours, s) | RTN (s) | reference rows | textbook GPTQ (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, t_ours, t_rtn, rr, t_ref, ratio in bench_gptq(args.quick):
        print(f"| {name} | {shape} | {t_ours:.2f} | {t_rtn:.2f} | {rr} | {t_ref:.2f} | {ratio:.1f}x |")
    print("\n| bits | tokens | shape | dense bf16 (ms) | packed exact (ms) | ratio | packed LUT (ms) | ratio | "
          "weight bytes packed / bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits, t, shape, td, te, tl, pb, db in bench_matmul(args.quick):
        lut = f"{tl * 1e3:.1f} | {tl / td:.2f}x" if tl is not None else "- | -"
        print(f"| {bits} | {t} | {shape} | {td * 1e3:.1f} | {te * 1e3:.1f} | {te / td:.2f}x | {lut} | "
              f"{pb / db:.3f} |")


if __name__ == "__main__":
    main()
