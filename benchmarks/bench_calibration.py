"""Calibration peak memory against one decoder layer's activations, at two model depths.

A Mixtral-architecture model (hidden 256, 8 experts, top-2) with 2 and with 8 decoder layers is calibrated on the
same tokens in a fresh process each; the peak resident memory above the loaded model is compared with the size of
one layer's hidden states over all calibration tokens (T x H x 4 bytes). If the pass held every layer's
activations (as the reference code did), the 8-layer run would need about 4x the 2-layer run's extra memory.

    .venv/bin/python benchmarks/bench_calibration.py [--tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(layers: int, seqs: int, seq_len: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate

    torch.set_num_threads(2)
    cfg = MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=seq_len, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 512, (8, seq_len), generator=g)} for _ in range(seqs // 8)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    calibrate(model, batches, CalibrationConfig(eps_bits=(1, 2, 3)), progress=False)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = seqs * seq_len
    return {"layers": layers, "tokens": tokens, "seconds": dt, "rss_before": base, "rss_peak": peak,
            "extra_bytes": peak - base, "one_layer_activation_bytes": tokens * 256 * 4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.seqs, args.seq_len)))
        return 0
    rows = []
    for layers in (2, 8):
        out = subprocess.run([sys.executable, __file__, "--child", str(layers), "--seqs", str(args.seqs),
                              "--seq-len", str(args.seq_len)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = 1 / 2**20
    print(f"{'layers':>6} {'tokens':>7} {'seconds':>8} {'extra MiB':>10} {'1-layer act MiB':>16} {'ratio':>6}")
    for r in rows:
        act = r["one_layer_activation_bytes"]
        print(f"{r['layers']:6d} {r['tokens']:7d} {r['seconds']:8.1f} {r['extra_bytes'] * mb:10.1f} "
              f"{act * mb:16.1f} {r['extra_bytes'] / act:6.2f}")
    print(f"extra memory, 8 layers / 2 layers: {rows[1]['extra_bytes'] / rows[0]['extra_bytes']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
