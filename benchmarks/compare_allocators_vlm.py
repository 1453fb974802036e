"""Held-out image-question exact match of bit allocators on the embedded tiny DeepSeek-VL2: paper PMQ, pmq+, uniform.

    nice -n 10 .venv/bin/python benchmarks/compare_allocators_vlm.py --targets 2.0 1.5 --seeds 0 1 2 \\
        --rows pmq pmq+ uniform --json runs/allocators_vlm.json

Data: per calibration seed, ``--calib-seqs`` rendered image questions of the training split (``embedded:vqa``, every
task in turn) build the statistics, plans and GPTQ Hessians; ``--select-seqs`` others (seed 50000 + seed) are pmq+'s
selection split (its loss: next-token cross-entropy over the answer tokens). Evaluation: greedy exact match,
teacher-forced (``mcmoe_vl.data.quality.vqa_exact_match``), on the first ``--eval-rows`` shipped held-out questions
of each of the six image tasks (colour, shape, count, position, digit, reading); the mean over the tasks is reported
(higher is better). Rows as in ``compare_allocators.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time

import torch
from compare_allocators import _paired

from mcmoe_vl.allocation.allocate import allocate
from mcmoe_vl.allocation.budget import AllocationError
from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.allocation.plus import PlusConfig, allocate_plus
from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.data.embedded import load_embedded_vlm
from mcmoe_vl.data.quality import VQA_CHANCE, vqa_exact_match, vqa_rows
from mcmoe_vl.io import write_json_atomic
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.qlinear import Runtime
from mcmoe_vl.suite.stages import vlm_batches, vlm_samples
from model_adapters import get_adapter

log = logging.getLogger("compare_allocators_vlm")


def answer_batches(processor, samples: list, batch_size: int = 8) -> list[dict]:
    """Selection batches whose ``labels`` are the answer tokens only (the model never learned to predict
    questions: their loss is large and says nothing about the answers)."""
    tag, out = processor.image_token, []
    for i in range(0, len(samples), batch_size):
        processed = []
        for smp in samples[i : i + batch_size]:
            text = smp.text if smp.text.count(tag) == len(smp.images) else tag * len(smp.images) + "\n" + smp.text
            conv = [{"role": "user", "content": text}, {"role": "assistant", "content": smp.answer}]
            full = processor.process_one(conv, list(smp.images), inference=False)
            n_prompt = len(processor.process_one(conv[:1], list(smp.images)).input_ids)
            full.target_ids = full.input_ids.clone()
            full.target_ids[:n_prompt] = -100
            processed.append(full)
        out.append(processor.collate(processed))
    return out


def accuracy(model, processor, rows: dict[str, list]) -> dict[str, float]:
    acc = {t: vqa_exact_match(model, processor, r) for t, r in rows.items()}
    return {**acc, "mean": statistics.fmean(acc.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[2.0, 1.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=["pmq", "pmq+", "uniform"])
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--select-seqs", type=int, default=16)
    ap.add_argument("--eval-rows", type=int, default=100)
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", nargs="+", default=None, help="only print the table of saved results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.from_json:
        runs = [json.loads(open(f, encoding="utf-8").read()) for f in args.from_json]
        print(table({**runs[0], "rows": [r for run in runs for r in run["rows"]]}))
        return
    torch.set_num_threads(1)
    model, processor = load_embedded_vlm()
    rows = {t: vqa_rows(t, args.eval_rows) for t in VQA_CHANCE}
    out: dict = {"16-bit": accuracy(model, processor, rows), "eval_rows_per_task": args.eval_rows, "rows": []}
    log.info("16-bit: %s", out["16-bit"])
    for seed in args.seeds:
        fit = vlm_batches(processor, vlm_samples("embedded:vqa", split="train", num=args.calib_seqs, seed=seed), 8,
                          "cpu")
        sel = answer_batches(processor, vlm_samples("embedded:vqa", split="train", num=args.select_seqs,
                                                    seed=50_000 + seed))
        stats = {"rtn": calibrate(model, fit, CalibrationConfig(), progress=False),
                 "gptq": calibrate(model, fit, CalibrationConfig(quantizer="gptq", refit_1bit=True), progress=False)}
        for target in args.targets:
            for row in args.rows:
                t0 = time.perf_counter()
                try:
                    if row == "pmq+":
                        plan = allocate_plus(model, stats["gptq"], fit, sel,
                                             AllocationConfig(method="pmq+", target_bits=target), PlusConfig(),
                                             adapter=get_adapter(model))
                    else:
                        plan = allocate(stats["rtn"], AllocationConfig(method=row, target_bits=target,
                                                                       require_widths=() if row == "uniform" else None))
                except AllocationError as exc:
                    log.info("seed %d target %g %s: unreachable (%s)", seed, target, row, exc)
                    continue
                m = copy.deepcopy(model)
                quantize_model(m, plan, fit, QuantizeConfig(runtime=Runtime.FAKE, progress=False),
                               adapter=get_adapter(m))
                acc = accuracy(m, processor, rows)
                rec = {"seed": seed, "target": target, "row": row, "exact_match": acc["mean"], "accuracy": acc,
                       "seconds": time.perf_counter() - t0, "chosen": (plan.selection or {}).get("chosen"),
                       "layers": [lp.nominal for lp in plan.layers]}
                log.info("seed %d target %g %s: mean exact match %.4f (%s)", seed, target, row, acc["mean"],
                         rec["chosen"])
                out["rows"].append(rec)
                if args.json:
                    write_json_atomic(args.json, out)
    print(table(out))


def table(out: dict) -> str:
    targets = sorted({r["target"] for r in out["rows"]})
    names = [n for n in ("pmq", "pmq+", "uniform") if any(r["row"] == n for r in out["rows"])]
    lines = [f"16-bit mean exact match: {out['16-bit']['mean']:.4f} ({out['eval_rows_per_task']} questions x 6 tasks)",
             "", "| allocator | " + " | ".join(f"{t:g} bits" for t in targets) + " |",
             "| --- | " + " | ".join("---:" for _ in targets) + " |"]
    for n in names:
        cells = []
        for t in targets:
            v = [r["exact_match"] for r in out["rows"] if r["row"] == n and r["target"] == t]
            sd = f" +- {statistics.stdev(v):.4f}" if len(v) > 1 else ""
            cells.append(f"{statistics.fmean(v):.4f}{sd} (n={len(v)})" if v else "n/a")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by seed (pmq+ minus the other row; positive: pmq+ better):", "",
              "| target | pmq+ - pmq | pmq+ - uniform |", "| --- | ---: | ---: |"]
    for t in targets:
        pmq, uni = (_paired(out["rows"], t, other, "exact_match") for other in ("pmq", "uniform"))
        lines.append(f"| {t:g} | {pmq} | {uni} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
