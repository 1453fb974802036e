"""Packed low-bit kernels at real sizes: one matrix, and whole MoE layers, against dense bf16 in the same run.

    .venv/bin/python -m mcmoe_vl.quant.native build          # once
    taskset -c 0,1 .venv/bin/python benchmarks/bench_kernels.py [--threads 2] [--repeat 41] [--quick]

1. ``y = x W^T`` for W of 14336 x 4096 (Mixtral's expert): dense bf16 ``F.linear``, torch's int4 CPU kernel
   (``_weight_int4pack_mm_for_cpu``, group 128), and the native SIMD kernels at 1-4 bits on each path the CPU has
   (AVX512-BF16 with bf16 tokens; AVX-512 and AVX2 with float32 tokens), for 1, 8 and 32 tokens; at 128 tokens
   the panel GEMM (what ``Kernel.SIMD`` runs), dequantise + GEMM, and the torch dequantising path (``Kernel.AUTO``).
2. One MoE layer (routing excluded, the same random routings for every variant): Mixtral-8x7B dims (hidden 4096,
   expert 14336, 8 experts top-2) and DeepSeek-VL2-tiny dims (hidden 1280, expert 896, 64 routed top-6, shared
   experts as one 1792-wide MLP at 4 bits). Dense bf16 runs transformers' eager expert loop; packed runs the fused
   native call (``FusedMoE``) or, for prefill, the eager loop over packed experts. Widths: uniform 2-bit, and a
   PMQ-like per-expert plan averaging 2.5 bits (3,2,1,3,3,2,3,3 repeated). Decode (1 token) and prefill (128),
   each also with 15% of the (token, expert) pairs pruned (never a token's top-1). Every round runs all variants on
   one routing, so ratios are per round.

Weights are random (codes, scales and zeros drawn at random: speed does not depend on their values). Every kernel
is timed in rounds next to its baseline (dense bf16 F.linear / the dense eager loop) and each ratio is the median
of the per-round ratios with its range, so a drift of the machine's speed during the run cancels. Between two calls
of one kernel, dense bf16 reads 117 MB (a matrix) or more, so the packed weights come from memory, not from the
L3, as in a model's decode step. The CPU is shared: the header prints the load average before and after;
``--clock cpu --threads 1`` counts the thread's CPU time, which other jobs do not inflate (they still share the
caches and memory bandwidth).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from mcmoe_vl.moe.fused import FusedMoE
from mcmoe_vl.quant import kernels, native
from mcmoe_vl.quant.packed import PackedMeta, PackedTensor
from mcmoe_vl.quant.packing import packed_row_bytes
from mcmoe_vl.quant.qlinear import Kernel, QuantExpert, QuantExperts, QuantLinear

PMQ_25 = (3, 2, 1, 3, 3, 2, 3, 3)  # 2.5 bits on average


CLOCK = time.perf_counter  # or time.thread_time (--clock cpu, one thread): immune to being descheduled


def stats(fn, repeat: int) -> tuple[float, float, float, float]:
    """(median, 10th, 90th percentile, mean) seconds over ``repeat`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(repeat):
        t = CLOCK()
        fn()
        ts.append(CLOCK() - t)
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return statistics.median(ts), q[0], q[-1], statistics.fmean(ts)


def random_packed(bits: int, r: int, c: int, g: torch.Generator, gs: int = 128) -> PackedTensor:
    G = -(-c // gs)
    q = torch.randint(0, 256, (r, packed_row_bytes(c, bits)), dtype=torch.uint8, generator=g)
    s = (torch.rand(r, G, generator=g) * 0.01 + 0.001).half()
    z = None if bits == 1 else torch.randint(0, 1 << bits, (r, G), generator=g).half()
    return PackedTensor(q, s, z, None, PackedMeta(bits, (r, c), gs))


def bench_matrix(r: int, c: int, repeat: int) -> None:
    g = torch.Generator().manual_seed(0)
    dense = (torch.randn(r, c, generator=g) * 0.02).bfloat16()
    q4 = torch.randint(0, 16, (r, c), dtype=torch.int32, generator=g)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 2)
    sz = torch.randn(c // 128, r, 2, generator=g).bfloat16()
    paths = [i for i in native.Isa if i <= native.cpu_isa() and i != native.Isa.SCALAR]
    bf16 = bool(native.load().mq_cpu_bf16())
    print(f"\n### One matrix {r} x {c}, against dense bf16 in the same round\n")
    print(f"Each kernel runs {repeat} rounds of dense bf16 F.linear, the kernel, dense again; the ratio is the median "
          "of the per-round ratios [min-max], so a drift of the machine's speed during the run cancels.\n")
    print("| tokens | kernel | bits | median ms | ratio to dense bf16 [min-max] |\n|---|---|---|---|---|")
    for t in (1, 8, 32, 128):
        x = torch.randn(t, c, generator=g)
        xb = x.bfloat16()
        rounds = repeat if t <= 8 else max(5, repeat // 4)
        base = lambda: F.linear(xb, dense)  # noqa: E731

        def row(label: str, bits: int, fn) -> None:
            times, ratios = paired(fn, base, rounds)
            print(f"| {t} | {label} | {bits} | {statistics.median(times) * 1e3:.3f} | "
                  f"{statistics.median(ratios):.3f}x [{min(ratios):.3f}-{max(ratios):.3f}] |")

        print(f"| {t} | dense bf16 F.linear | 16 | {stats(base, rounds)[0] * 1e3:.3f} | 1 |")
        if t <= 32:
            row("torch int4 (_weight_int4pack_mm_for_cpu)", 4,
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w4, 128, sz))
        for bits in (1, 2, 3, 4):
            p = random_packed(bits, r, c, g)
            if t == 128:  # prefill: what Kernel.SIMD runs, and the dequantising paths
                row("packed SIMD (cpu_matmul): the panel GEMM" if bf16 else "packed SIMD (cpu_matmul)", bits,
                    lambda: kernels.cpu_matmul(xb, p))
                row("dequantise into a reused buffer + bf16 F.linear (prefill_matmul)", bits,
                    lambda: kernels.prefill_matmul(xb, p))
                if bits == 2:
                    lin = QuantLinear(p, dtype=torch.bfloat16, kernel=Kernel.AUTO)
                    row("packed AUTO: torch-order dequantise + bf16 F.linear", bits, lambda: lin(xb))
                continue
            if bf16:  # bf16 tokens, as a bf16 model passes them: the AVX512-BF16 path
                row("native avx512_bf16 (bf16 tokens)", bits, lambda: kernels.packed_matmul(xb, p, isa="avx512_bf16"))
                if t > 1:  # the register-blocked product and the panel GEMM (cpu_matmul's choices above 2 tokens)
                    row("native blocked avx512_bf16 (bf16 tokens)", bits, lambda: kernels.blocked_matmul(xb, p))
                    row("native panel GEMM (bf16 tokens)", bits, lambda: kernels.panel_matmul(xb, p))
            for isa in paths:  # float32 tokens
                row(f"native {isa.name.lower()} (float32 tokens)", bits,
                    lambda: kernels.packed_matmul(x, p, isa=isa))
            if bits == 1 and t <= 2:  # 1-bit decode with the table lookup off: the kernels it replaces
                kernels.set_lut1(False)
                try:
                    if bf16:
                        row("native avx512_bf16 (bf16 tokens), table lookup off: bf16 dot products", 1,
                            lambda: kernels.packed_matmul(xb, p, isa="avx512_bf16"))
                    if native.Isa.AVX512 in paths:
                        row("native avx512 (float32 tokens), table lookup off: bit planes", 1,
                            lambda: kernels.packed_matmul(x, p, isa="avx512"))
                finally:
                    kernels.set_lut1(True)


def paired(fn, base, rounds: int) -> tuple[list[float], list[float]]:
    """``rounds`` rounds of base, fn, base: fn's times and its ratio to the mean of the two base times around it."""
    fn(), base()
    times, ratios = [], []
    for _ in range(rounds):
        t0 = CLOCK()
        base()
        t1 = CLOCK()
        fn()
        t2 = CLOCK()
        base()
        t3 = CLOCK()
        times.append(t2 - t1)
        ratios.append((t2 - t1) / (((t1 - t0) + (t3 - t2)) / 2))
    return times, ratios


def dense_moe(gu: torch.Tensor, down: torch.Tensor, shared, x, idx, w):
    """transformers 5's eager experts loop in bf16; pruned pairs carry the sentinel index E."""
    E = gu.shape[0]
    out = torch.zeros_like(x)
    mask = F.one_hot(idx, num_classes=E + 1).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = int(e[0])
        if e == E:
            continue
        pos, tok = torch.where(mask[e])
        gt, up = F.linear(x[tok], gu[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gt) * up, down[e]) * w[tok, pos, None]
        out.index_add_(0, tok, y)
    if shared is not None:
        sg, su, sd = shared
        out = out + F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)
    return out


def packed_expert(bits: int, h: int, i: int, g: torch.Generator, kernel: Kernel) -> QuantExpert:
    mk = lambda p: QuantLinear(p, dtype=torch.bfloat16, kernel=kernel)  # noqa: E731
    return QuantExpert(mk(random_packed(bits, h, i, g)), F.silu, gate_up=mk(random_packed(bits, 2 * i, h, g)))


class _Shared(torch.nn.Module):
    def __init__(self, h, i, g, kernel):
        super().__init__()
        mk = lambda r, c: QuantLinear(random_packed(4, r, c, g), dtype=torch.bfloat16, kernel=kernel)  # noqa: E731
        self.gate_proj, self.up_proj, self.down_proj = mk(i, h), mk(i, h), mk(h, i)
        self.act_fn = F.silu

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def routing(T: int, E: int, k: int, prune: float, g: torch.Generator):
    """Random top-k routing of T tokens (slot 0 = top-1), and a keep-mask dropping ``prune`` of the pairs, never a
    token's top-1."""
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g).bfloat16()
    keep = torch.rand(T, k, generator=g) >= prune * k / max(k - 1, 1)
    keep[:, 0] = True
    return idx, w, keep


def moe_variants(h: int, i: int, E: int, shared_i: int, T: int, g: torch.Generator) -> dict:
    """name -> fn(x, idx, w, keep): dense bf16's eager loop, and the packed layer at two plans (decode: the fused
    native call; prefill: the eager loop over packed experts)."""
    gu = (torch.randn(E, 2 * i, h, generator=g) * 0.02).bfloat16()
    down = (torch.randn(E, h, i, generator=g) * 0.02).bfloat16()
    sh_d = None
    if shared_i:
        sh_d = tuple((torch.randn(*s, generator=g) * 0.02).bfloat16() for s in ((shared_i, h), (shared_i, h),
                                                                               (h, shared_i)))
    out = {"dense bf16 eager loop": lambda x, idx, w, keep: dense_moe(gu, down, sh_d, x, idx.masked_fill(~keep, E), w)}
    for pname, widths in {"uniform 2-bit": [2] * E, "PMQ-like 2.5-bit": [PMQ_25[e % 8] for e in range(E)]}.items():
        experts = [packed_expert(b, h, i, g, Kernel.SIMD) for b in widths]
        shared = [_Shared(h, shared_i, g, Kernel.SIMD)] if shared_i else []
        if T == 1:
            fused = FusedMoE.build(experts, shared)
            out[f"{pname}: packed, fused native call"] = lambda x, idx, w, keep, f=fused: f(x, idx, w, keep)
        else:
            qe = QuantExperts(experts, F.silu)

            def run(x, idx, w, keep, qe=qe, shared=shared):
                y = qe(x, idx.masked_fill(~keep, E), w)
                for s_ in shared:
                    y = y + s_(x)
                return y
            out[f"{pname}: packed, eager loop over experts (cpu_matmul: blocked product / panel GEMM)"] = run
    return out


def bench_moe(name: str, h: int, i: int, E: int, k: int, shared_i: int, repeat: int) -> None:
    g = torch.Generator().manual_seed(1)
    print(f"\n### MoE layer, {name}: hidden {h}, expert {i}, {E} experts top-{k}"
          f"{f', shared MLP {shared_i} at 4 bits' if shared_i else ''}\n")
    print("Each round draws a routing and runs every variant on it, unpruned and with 15 % of the (token, expert) "
          "pairs pruned; ratios to dense bf16 are medians of per-round ratios [min-max]; the speed-up from pruning is "
          "total unpruned / total pruned time over the rounds [per-round min-max] (with top-2 and one token, a "
          "round prunes either nothing or half the pairs, so its median says little).\n")
    print("| tokens | variant | median ms | ratio to dense | median ms, 15 % pruned | ratio to dense, pruned | "
          "speed-up from pruning |\n|---|---|---|---|---|---|---|")
    for T in (1, 128):
        rounds = repeat if T == 1 else max(5, repeat // 4)
        variants = moe_variants(h, i, E, shared_i, T, g)
        x = torch.randn(T, h, generator=g).bfloat16()
        times = {(n, p): [] for n in variants for p in (0, 1)}
        for rnd in range(rounds + 1):  # round 0 warms up
            idx, w, keep = routing(T, E, k, 0.15, g)
            for n, fn in variants.items():
                for p, kp in ((0, torch.ones_like(keep)), (1, keep)):
                    t0 = CLOCK()
                    fn(x, idx, w, kp)
                    if rnd:
                        times[(n, p)].append(CLOCK() - t0)
        dense = next(iter(variants))

        def cell(a: list[float], b: list[float]) -> str:
            r = [u / v for u, v in zip(a, b)]
            return f"{statistics.median(r):.3f}x [{min(r):.3f}-{max(r):.3f}]"
        for n in variants:
            t0, t1 = times[(n, 0)], times[(n, 1)]
            r = [u / v for u, v in zip(t0, t1)]
            print(f"| {T} | {n} | {statistics.median(t0) * 1e3:.3f} | {cell(t0, times[(dense, 0)])} | "
                  f"{statistics.median(t1) * 1e3:.3f} | {cell(t1, times[(dense, 1)])} | "
                  f"{sum(t0) / sum(t1):.3f}x [{min(r):.3f}-{max(r):.3f}] |")
        del variants


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=41)
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--only", choices=["matrix", "moe"], default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the calling thread's CPU time (needs --threads 1; not inflated by other jobs)")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            raise SystemExit("--clock cpu measures the calling thread only: use it with --threads 1")
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("native kernels are not built: run `python -m mcmoe_vl.quant.native build` first")
    print(f"CPU: {cpu_model()}, best SIMD path {native.cpu_isa().name}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock; load average before: {os.getloadavg()}")
    if args.only in (None, "matrix"):
        bench_matrix(*((1024, 512) if args.quick else (14336, 4096)), args.repeat)
    if args.only in (None, "moe"):
        if args.quick:
            bench_moe("quick", 256, 384, 8, 2, 0, args.repeat)
            bench_moe("quick shared", 256, 128, 16, 6, 256, args.repeat)
        else:
            bench_moe("Mixtral-8x7B", 4096, 14336, 8, 2, 0, args.repeat)
            bench_moe("DeepSeek-VL2-tiny", 1280, 896, 64, 6, 1792, args.repeat)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
