"""Held-out perplexity at equal reduction in active experts: ratio rule alone, ODP with protection, OTP.

    .venv/bin/python benchmarks/compare_pruning.py --model embedded/mixtral-tiny [--rates 0.15 0.25] \\
        [--protect 0.02] [--seq-len 256] [--calib-seqs 32] [--eval-seqs 64] [--json out.json]
    .venv/bin/python benchmarks/compare_pruning.py --tiny-random      # mechanics only (no trained model)

Data: the standard library's docstrings (``mcmoe_vl.data.text``; byte tokens): calibration windows from the
training split (seeded), evaluation on consecutive windows of the held-out split. For each requested reduction
``r`` (fraction of top-k (token, expert) pairs not computed):

- ratio rule: ``mu`` per layer = the ratio quantile that prunes ``r`` on the calibration tokens, no protection;
- ODP: the same rule plus protection of the top ``--protect`` tokens per sequence (Eq. 6); since protected tokens
  keep all experts, the ratio quantile is raised (bisection on the calibration tokens) until the measured reduction
  with protection equals ``r``;
- OTP: predictors trained with ``prune_rate = r`` (offset calibrated to ``r`` on the calibration tokens).

The reduction and perplexity are both measured on the held-out windows (ActivationMeter), so the table shows how
equal the reductions really were.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mcmoe_vl.pruning.accounting import ActivationMeter
from mcmoe_vl.pruning.importance import token_importance
from mcmoe_vl.pruning.odp import ODPRule, ODPThresholds, RatioCollector, run_batches, threshold_from_ratios
from mcmoe_vl.pruning.otp import OTPConfig, OTPRule, train_otp
from model_adapters import expert_interface

log = logging.getLogger("compare_pruning")


def windows(ids: list[int], seq_len: int, num: int, *, seed: int | None) -> torch.Tensor:
    t = torch.tensor(ids, dtype=torch.int64)
    if seed is None:  # consecutive, non-overlapping
        n = min(num, t.numel() // seq_len)
        return t[: n * seq_len].reshape(n, seq_len)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, t.numel() - seq_len + 1, (num,), generator=g).tolist()
    return torch.stack([t[s : s + seq_len] for s in starts])


def perplexity(model, ids: torch.Tensor, batch: int = 8, meter: ActivationMeter | None = None) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i : i + batch]
            logits = model(x, use_cache=False).logits[:, :-1].float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            n += x[:, 1:].numel()
    return math.exp(nll / n)


def random_importance(hidden: torch.Tensor, stats) -> torch.Tensor:
    """Ablation: uniform random protection scores (padding excluded), seeded per call shape."""
    g = torch.Generator().manual_seed(hidden.shape[0] * 7919 + hidden.shape[1])
    return torch.rand(hidden.shape[:2], generator=g).masked_fill(~stats.valid, float("-inf"))


def measured_reduction(model, iface, batches) -> float:
    with ActivationMeter(iface) as meter:
        run_batches(model, batches)
    return meter.report().reduction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded/mixtral-tiny")
    ap.add_argument("--tiny-random", action="store_true", help="a tiny random Mixtral instead (mechanics only)")
    ap.add_argument("--rates", type=float, nargs="*", default=[0.15, 0.25])
    ap.add_argument("--protect", type=float, default=0.02)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--eval-seqs", type=int, default=64)
    ap.add_argument("--otp-steps", type=int, default=300)
    ap.add_argument("--otp-lr", type=float, default=OTPConfig().lr)
    ap.add_argument("--methods", nargs="*", default=["ratio", "odp", "otp"],
                    choices=["ratio", "odp", "odp-random", "otp"],
                    help="odp-random: ODP protecting random tokens instead of Eq. 6's (ablation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from mcmoe_vl.data.text import stdlib_splits
    from mcmoe_vl.data.tokenizer import encode_bytes

    splits = stdlib_splits()
    if args.tiny_random:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
        model = MixtralForCausalLM(cfg).eval()
        name = "tiny random Mixtral (untrained)"
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = args.model
    model.set_experts_implementation("eager")
    calib = windows(encode_bytes(splits.train_text()), args.seq_len, args.calib_seqs, seed=args.seed)
    held = windows(encode_bytes(splits.heldout_text()), args.seq_len, args.eval_seqs, seed=None)
    calib_batches = [{"input_ids": calib[i : i + 8]} for i in range(0, calib.shape[0], 8)]
    eval_batches = [{"input_ids": held[i : i + 8]} for i in range(0, held.shape[0], 8)]
    results = {"model": name, "seq_len": args.seq_len, "calib_tokens": calib.numel(), "eval_tokens": held.numel(),
               "protect": args.protect, "rows": []}

    with expert_interface(model) as iface:
        base_ppl = perplexity(model, held)
        results["unpruned_ppl"] = base_ppl
        log.info("unpruned held-out ppl %.4f", base_ppl)
        # Ratio samples once (unpruned model, calibration tokens).
        collector = RatioCollector()
        handle = iface.observe(collector)
        run_batches(model, calib_batches)
        handle.remove()
        samples = {la.index: collector.samples(la.index) for la in iface.layers}
        k = iface.layers[0].top_k

        def thresholds(rate: float, protect: float) -> ODPThresholds:
            return ODPThresholds(mu={i: threshold_from_ratios(s, top_k=k, prune_rate=min(rate, (k - 1) / k))
                                     for i, s in samples.items()}, protect_ratio=protect)

        def evaluate(label: str, rule, target: float, extra: dict) -> None:
            t = time.time()
            with rule:
                with ActivationMeter(iface) as meter:
                    ppl = perplexity(model, held)
            rep = meter.report()
            row = {"method": label, "target": target, "heldout_reduction": rep.reduction,
                   "avg_active_experts": rep.avg_active_experts,
                   "activated_params_reduction": rep.activated_params_reduction, "ppl": ppl,
                   "ppl_increase": ppl / base_ppl - 1, **extra}
            results["rows"].append(row)
            log.info("%-22s target %.2f: held-out reduction %.4f, ppl %.4f (%+.2f%%) [%.0fs]", label, target,
                     rep.reduction, ppl, 100 * row["ppl_increase"], time.time() - t)

        for rate in args.rates:
            if "ratio" in args.methods:
                evaluate("ratio rule", ODPRule(iface, thresholds(rate, 0.0)), rate, {"fit_rate": rate})
            if "otp" in args.methods:
                preds, summary = train_otp(model, calib_batches, OTPConfig(prune_rate=rate, steps=args.otp_steps,
                                                                           lr=args.otp_lr, seed=args.seed), iface=iface, progress=False)
                evaluate("OTP", OTPRule(iface, preds), rate, {"fit_rate": rate, "otp_summary": summary})
            for variant in [m for m in ("odp", "odp-random") if m in args.methods]:
                importance = token_importance if variant == "odp" else random_importance
                # Raise the ratio quantile until the calibration reduction with protection is back at `rate`.
                lo, hi = rate, min((k - 1) / k, rate * 1.5 + 0.02)
                for _ in range(8):
                    mid = 0.5 * (lo + hi)
                    with ODPRule(iface, thresholds(mid, args.protect), importance=importance):
                        red = measured_reduction(model, iface, calib_batches)
                    lo, hi = (mid, hi) if red < rate else (lo, mid)
                fit = 0.5 * (lo + hi)
                label = f"ODP + {args.protect:.0%} protection" + (" (random tokens)" if variant != "odp" else "")
                evaluate(label, ODPRule(iface, thresholds(fit, args.protect), importance=importance), rate,
                         {"fit_rate": fit})

    print(f"\n{name}: held-out ppl unpruned {base_ppl:.4f} ({held.numel()} tokens, windows of {args.seq_len})")
    print("| target reduction | method | held-out reduction | avg active experts | held-out ppl | ppl increase |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        print(f"| {r['target']:.0%} | {r['method']} | {r['heldout_reduction']:.1%} | {r['avg_active_experts']:.3f} | "
              f"{r['ppl']:.4f} | {100 * r['ppl_increase']:+.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
