"""The whole pipeline at real size: calibrate, allocate, quantize, save and load, time and peak memory per stage.

    .venv/bin/python benchmarks/bench_pipeline.py [--layers 1 2 3] [--seqs 16] [--seq-len 256] [--threads 2]

The model is DeepSeek-VL2-tiny's language model geometry (hidden 1280, 64 routed experts of 1280 x 896, top-6, 2
shared experts; ``bench_decode_model.TINY_LM``) cut to ``--layers`` decoder layers, every one of them a MoE layer
(``first_k_dense_replace = 0``), with random weights in float32, calibrated on random token windows. Each layer
count runs in a fresh process; each stage's wall time and the process's peak resident memory after it are
reported. Per-stage time grows linearly with the number of MoE layers (each stage runs layer by layer), so two
layer counts give a per-layer cost and a fixed cost: ``t(L) = a + b * L``, which the script prints and uses to
extrapolate to DeepSeek-VL2-tiny's 11 MoE layers; a third layer count checks the fit. Peak memory here is mostly the
float32 model itself (one layer's 64 experts are 0.88 GB). Mixtral-8x7B's other shapes are extrapolated in
``docs/quantization.md`` from the per-matrix GPTQ time of ``bench_quant.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VL2_TINY_MOE_LAYERS = 11


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(layers: int, seqs: int, seq_len: int, threads: int) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import torch

    from bench_decode_model import TINY_LM
    from mcmoe_vl.allocation.allocate import allocate
    from mcmoe_vl.allocation.config import AllocationConfig
    from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
    from mcmoe_vl.quant.checkpoint import load_quantized, save_quantized
    from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
    from model_adapters import get_adapter
    from model_adapters.deepseek_vl2.configuration import LanguageConfig, text_config_from_official
    from model_adapters.deepseek_vl2.modeling import build_language_model

    torch.set_num_threads(threads)
    cfg = text_config_from_official(LanguageConfig(**{**TINY_LM, "num_hidden_layers": layers,
                                                      "first_k_dense_replace": 0, "vocab_size": 4096}))
    torch.manual_seed(0)
    model = build_language_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.02, generator=g)
    batches = [{"input_ids": torch.randint(0, 4096, (4, seq_len), generator=g)} for _ in range(seqs // 4)]
    out: dict = {"layers": layers, "tokens": seqs * seq_len, "threads": threads, "rss_loaded": _peak()}

    def stage(name, fn):
        t = time.perf_counter()
        result = fn()
        out[name] = {"seconds": time.perf_counter() - t, "peak_rss": _peak()}
        return result

    stats = stage("calibrate", lambda: calibrate(model, batches, CalibrationConfig(eps_bits=(1, 2, 3)),
                                                  progress=False))
    plan = stage("allocate", lambda: allocate(stats, AllocationConfig(target_bits=2.5)))
    report = stage("quantize", lambda: quantize_model(model, plan, batches, QuantizeConfig(progress=False),
                                                      adapter=get_adapter(model)))
    with tempfile.TemporaryDirectory() as d:
        stage("save", lambda: save_quantized(model, Path(d) / "q", plan=plan, report=report,
                                             adapter=get_adapter(model)))
        out["bytes_on_disk"] = sum(f.stat().st_size for f in (Path(d) / "q").iterdir())
        # the port's language model is not a transformers class: load_quantized gets a skeleton (built in the stage)
        stage("load", lambda: load_quantized(Path(d) / "q", model=build_language_model(cfg).eval()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.seqs, args.seq_len, args.threads)))
        return 0
    runs = []
    for n in args.layers:
        res = subprocess.run([sys.executable, __file__, "--child", str(n), "--seqs", str(args.seqs), "--seq-len",
                              str(args.seq_len), "--threads", str(args.threads)], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    stages = ("calibrate", "allocate", "quantize", "save", "load")
    print(f"{runs[0]['tokens']} calibration tokens, {runs[0]['threads']} threads")
    print("| layers | " + " | ".join(f"{s} s" for s in stages) + " | peak RSS GB | disk MB |")
    print("|---:|" + "---:|" * (len(stages) + 2))
    for r in runs:
        peak = max(r[s]["peak_rss"] for s in stages) / 1e9
        print(f"| {r['layers']} | " + " | ".join(f"{r[s]['seconds']:.1f}" for s in stages)
              + f" | {peak:.2f} | {r['bytes_on_disk'] / 1e6:.1f} |")
    if len(runs) >= 2:
        a_, b_ = runs[0], runs[1]  # the fit; a third run checks it
        dl = b_["layers"] - a_["layers"]
        total = lambda r: sum(r[s]["seconds"] for s in stages)  # noqa: E731
        peak = lambda r: max(r[s]["peak_rss"] for s in stages)  # noqa: E731
        per_layer, mem_per_layer = (total(b_) - total(a_)) / dl, (peak(b_) - peak(a_)) / dl
        fixed, mem_fixed = total(a_) - per_layer * a_["layers"], peak(a_) - mem_per_layer * a_["layers"]
        print(f"fit on {a_['layers']} and {b_['layers']} layers: time {fixed:.1f} s + {per_layer:.1f} s x L, "
              f"peak RSS {mem_fixed / 1e9:.2f} GB + {mem_per_layer / 1e9:.2f} GB x L")
        for c in runs[2:]:
            L = c["layers"]
            print(f"check at {L} layers: time predicted {fixed + per_layer * L:.1f} s, measured {total(c):.1f} s; "
                  f"peak RSS predicted {(mem_fixed + mem_per_layer * L) / 1e9:.2f} GB, measured {peak(c) / 1e9:.2f} GB")
        L = VL2_TINY_MOE_LAYERS
        print(f"DeepSeek-VL2-tiny ({L} MoE layers, float32 weights in memory): {fixed + per_layer * L:.0f} s, "
              f"{(mem_fixed + mem_per_layer * L) / 1e9:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
