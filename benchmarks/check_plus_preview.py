"""How faithful is pmq+'s cheap preview? Each candidate at one target: the preview's selection loss against the loss of
the model really quantized by the engine (sequential GPTQ, 4-bit attention), and the held-out byte perplexity.

    nice -n 10 .venv/bin/python benchmarks/check_plus_preview.py [--target 2.0] [--seed 0] [--select-seqs 16 64]

Data as in ``compare_allocators.py`` (plan building: the first 90 % of the training split; selection: the rest).
"""

from __future__ import annotations

import argparse
import copy

import torch
from compare_allocators import ROOT, byte_ppl, heldout_windows
from transformers import AutoModelForCausalLM

from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.allocation.plus import PlusConfig, allocate_plus, build_candidates, calibration_loss
from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.calibration.data import batches_from_ids, token_windows
from mcmoe_vl.data.text import stdlib_splits
from mcmoe_vl.data.tokenizer import encode_bytes
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.qlinear import Runtime
from model_adapters import get_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--select-seqs", type=int, nargs="+", default=[16, 64])
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(ROOT / "embedded" / "mixtral-tiny", dtype=torch.float32).eval()
    train = torch.tensor(encode_bytes(stdlib_splits().train_text()), dtype=torch.int64)
    cut = int(train.numel() * 0.9)
    fit = batches_from_ids(token_windows(train[:cut], 256, 32, seed=args.seed), 8)
    sels = {n: batches_from_ids(token_windows(train[cut:], 256, n, seed=args.seed), 8) for n in args.select_seqs}
    stats = calibrate(model, fit, CalibrationConfig(quantizer="gptq", refit_1bit=True), progress=False)
    config = AllocationConfig(method="pmq+", target_bits=args.target)
    adapter = get_adapter(model)
    preview = allocate_plus(model, stats, fit, sels[args.select_seqs[0]], config, adapter=adapter).selection
    previewed = {c["name"]: c["loss"] for c in preview["candidates"]}
    cands, _ = build_candidates(stats, config, PlusConfig())
    wins = heldout_windows(256)
    print(f"| candidate | preview loss ({args.select_seqs[0]} seqs) | "
          + " | ".join(f"engine loss ({n} seqs)" for n in args.select_seqs) + " | held-out ppl |")
    print("| --- | ---: | " + " | ".join("---:" for _ in args.select_seqs) + " | ---: |")
    for c in cands:
        m = copy.deepcopy(model)
        plan = c.plan.model_copy(update={"refit_1bit": True})
        quantize_model(m, plan, fit, QuantizeConfig(runtime=Runtime.FAKE, progress=False), adapter=get_adapter(m))
        engine = " | ".join(f"{calibration_loss(m, sels[n], adapter)[0]:.5f}" for n in args.select_seqs)
        print(f"| {c.name} | {previewed[c.name]:.5f} | {engine} | {byte_ppl(m, wins)[0]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
