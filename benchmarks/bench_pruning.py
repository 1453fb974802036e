"""MoE-layer time with 0 / 15 / 30 % fewer (token, expert) pairs, and the overheads of ODP and OTP.

    .venv/bin/python benchmarks/bench_pruning.py [--tokens 512] [--hidden 1024] [--repeats 9] [--threads 1]

Two layer shapes, both through the common expert interface (``MoELayer.forward_block``): Mixtral-like (8 experts,
top-2, intermediate 2048) and DeepSeek-like (64 experts, top-6, intermediate 512). For each, a routing override
drops exactly the requested fraction of (token, expert) pairs (random non-top-1 pairs, seeded), so the expert work
falls by that fraction; ideal speed-up = 1 / (1 - fraction); the layer ideal counts only the routed experts'
time as shrinking (router, shared experts and dispatch stay). Timings are the best of interleaved repeats after a
warm-up of each setting, in CPU time of the benchmark's single thread by default (other processes share this CPU;
CPU time is what the layer costs, undisturbed by waiting for a core; ``--clock wall`` for wall-clock). Also measured: the interface's dispatch overhead
(the layer's time minus the experts' own matmuls on pre-gathered rows), the cost of Eq. 6 column sums from Q and
K for one attention layer, and the OTP predictor and the ratio rule per layer call.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM

from mcmoe_vl.moe import RoutingDecision
from mcmoe_vl.pruning.importance import attention_column_stats
from mcmoe_vl.pruning.odp import ratio_keep
from mcmoe_vl.pruning.otp import MaskPredictor
from model_adapters import expert_interface


def build(kind: str, hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = MixtralConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                            num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
        model = MixtralForCausalLM(cfg)
    else:
        cfg = DeepseekV3Config(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                               moe_intermediate_size=hidden // 2, num_hidden_layers=1, first_k_dense_replace=0,
                               num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                               num_experts_per_tok=6, n_shared_experts=1, n_group=1, topk_group=1,
                               kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32,
                               v_head_dim=32)
        model = DeepseekV3ForCausalLM(cfg)
    model.set_experts_implementation("eager")
    return model.eval()


def drop_random(fraction: float, seed: int = 0):
    """A routing override removing ``fraction`` of all top-k pairs (never the top-1), chosen at random."""
    def override(layer, hidden, batch_shape, routing):
        T, k = routing.topk_idx.shape
        n_drop = round(fraction * T * k)
        if n_drop == 0:
            return None
        keep = torch.ones(T, k, dtype=torch.bool)
        top = routing.top1_slot()
        cand = torch.ones(T, k, dtype=torch.bool).scatter_(1, top[:, None], False).reshape(-1).nonzero().flatten()
        g = torch.Generator().manual_seed(seed)
        keep.view(-1)[cand[torch.randperm(cand.numel(), generator=g)[:n_drop]]] = False
        return RoutingDecision.keep_only(routing, keep, layer.spec)
    return override


CLOCK = time.perf_counter  # set from --clock


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return min(times)


def bench_layer(kind: str, tokens: int, hidden: int, repeats: int, fractions: list[float]) -> dict:
    model = build(kind, hidden)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, hidden, generator=g)
    out: dict = {"kind": kind, "tokens": tokens, "hidden": hidden}
    with torch.no_grad(), expert_interface(model) as iface:
        layer = iface.layers[0]
        out["experts"], out["top_k"] = layer.num_experts, layer.top_k
        routing = layer.route(x.reshape(-1, hidden))
        overrides = {f: drop_random(f) for f in fractions}
        for f in fractions:  # warm-up of every setting
            layer.routing_override = overrides[f] if f > 0 else None
            layer.forward_block(x)
        runs: dict[float, list[float]] = {f: [] for f in fractions}
        for _ in range(repeats):  # interleaved, so load changes hit every setting alike
            for f in fractions:
                layer.routing_override = overrides[f] if f > 0 else None
                t = CLOCK()
                layer.forward_block(x)
                runs[f].append(CLOCK() - t)
        layer.routing_override = None
        base = min(runs[0.0])
        # The experts' own work on pre-gathered rows (no dispatch): routed experts, and the shared experts apart.
        idx = routing.topk_idx
        xs = x.reshape(-1, hidden)
        experts = [layer.expert(e) for e in range(layer.num_experts)]
        gathered = [(experts[e], xs[(idx == e).any(dim=1)]) for e in range(layer.num_experts)]
        gathered = [(ex, r) for ex, r in gathered if r.shape[0]]
        shared = layer.shared_experts

        def routed_only():
            for ex, rows_ in gathered:
                ex(rows_)
        t_routed = best_time(routed_only, repeats)
        t_shared = best_time(lambda: shared(x), repeats) if shared is not None else 0.0
        out["routed_experts_seconds"], out["shared_experts_seconds"] = t_routed, t_shared
        out["dispatch_overhead_fraction"] = 1.0 - (t_routed + t_shared) / base
        rows = []
        for f in fractions:
            t = min(runs[f])
            speedup, ideal = base / t, 1.0 / (1.0 - f)
            # Layer ideal: only the routed experts' work shrinks (router, shared experts, dispatch stay).
            layer_ideal = base / (base - f * t_routed)
            rows.append({"fraction": f, "seconds": t, "speedup": speedup, "ideal": ideal, "of_ideal": speedup / ideal,
                         "layer_ideal": layer_ideal, "of_layer_ideal": speedup / layer_ideal,
                         "saved_of_ideal": (1 - t / base) / f if f > 0 else None})
        out["rows"] = rows
        # ODP ratio rule and OTP predictor per layer call.
        w = routing.topk_weight
        out["ratio_rule_seconds"] = best_time(lambda: ratio_keep(w, 0.5), repeats)
        pred = MaskPredictor(hidden, layer.top_k, 32).eval()
        out["otp_predictor_seconds"] = best_time(lambda: pred.keep(xs, w), repeats)
        out["otp_overhead_fraction"] = out["otp_predictor_seconds"] / base
        out["ratio_rule_overhead_fraction"] = out["ratio_rule_seconds"] / base
    return out


def bench_importance(tokens: int, hidden: int, repeats: int, moe_seconds: float) -> dict:
    """Eq. 6 column sums recomputed from Q and K (sdpa models) vs one sdpa attention call, same shapes."""
    heads, kv, d = 16, 4, hidden // 16
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, heads, tokens, d, generator=g)
    k = torch.randn(1, kv, tokens, d, generator=g)
    v = torch.randn(1, kv, tokens, d, generator=g)
    with torch.no_grad():
        t_cols = best_time(lambda: attention_column_stats(q, k, None, d ** -0.5), repeats)
        kr, vr = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        t_sdpa = best_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True),
                             repeats)
    return {"column_sums_seconds": t_cols, "sdpa_seconds": t_sdpa, "vs_sdpa": t_cols / t_sdpa,
            "vs_moe_layer": t_cols / moe_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.0, 0.15, 0.30])
    ap.add_argument("--kinds", nargs="*", default=["mixtral", "deepseek"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other processes)")
    ap.add_argument("--clock", choices=["thread", "wall"], default="thread",
                    help="thread CPU time (default: robust to other processes on a shared CPU; needs --threads 1) "
                         "or wall-clock")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread measures the calling thread only: use --threads 1 or --clock wall")
        CLOCK = time.thread_time
    if 0.0 not in args.fractions:
        args.fractions = [0.0, *args.fractions]
    results = {"threads": torch.get_num_threads(), "clock": args.clock, "layers": []}
    for kind in args.kinds:
        r = bench_layer(kind, args.tokens, args.hidden, args.repeats, args.fractions)
        results["layers"].append(r)
        print(f"\n{kind}: {r['experts']} experts top-{r['top_k']}, hidden {args.hidden}, {args.tokens} tokens")
        print("  fewer pairs | MoE layer ms | speed-up | ideal 1/(1-f) | of ideal | layer ideal | of layer ideal")
        for row in r["rows"]:
            print(f"  {row['fraction']:>11.0%} | {1e3 * row['seconds']:>12.1f} | {row['speedup']:>8.3f} | "
                  f"{row['ideal']:>13.3f} | {row['of_ideal']:>8.3f} | {row['layer_ideal']:>11.3f} | "
                  f"{row['of_layer_ideal']:>14.3f}")
        print(f"  routed experts alone {1e3 * r['routed_experts_seconds']:.1f} ms, shared experts "
              f"{1e3 * r['shared_experts_seconds']:.1f} ms (unpruned layer {1e3 * r['rows'][0]['seconds']:.1f} ms)")
        print(f"  dispatch overhead {r['dispatch_overhead_fraction']:.1%} of the unpruned layer; "
              f"ratio rule {r['ratio_rule_overhead_fraction']:.2%}, OTP predictor {r['otp_overhead_fraction']:.2%}")
    imp = bench_importance(args.tokens, args.hidden, args.repeats, results["layers"][0]["rows"][0]["seconds"])
    results["importance"] = imp
    print(f"\nEq. 6 column sums from Q/K ({args.tokens} tokens, 16 heads): {1e3 * imp['column_sums_seconds']:.1f} ms "
          f"= {imp['vs_sdpa']:.2f}x one sdpa attention call, {imp['vs_moe_layer']:.1%} of the first MoE layer")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
