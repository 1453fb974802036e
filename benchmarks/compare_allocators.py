"""Held-out byte perplexity of bit allocators on the embedded tiny Mixtral: paper PMQ, pmq+, uniform and baselines.

    nice -n 10 .venv/bin/python benchmarks/compare_allocators.py --targets 2.0 1.5 --seeds 0 1 2 \\
        --rows pmq pmq+ uniform --json runs/allocators.json
    .venv/bin/python benchmarks/compare_allocators.py --targets 1.25 1.5 1.75 2.0 2.5 \\
        --rows pmq pmq+ uniform hessian random fnorm          # the full table

Data (byte tokens, the model's domain): the training split of the embedded standard-library docstrings is cut in
two at ``--select-fraction`` from its end; per calibration seed, ``--calib-seqs`` windows of ``--seq-len`` from the
first part build the statistics, the plans and the GPTQ Hessians, and ``--select-seqs`` windows from the second
part are pmq+'s selection split. Evaluation: every held-out document of ``tasks/lm_eval/data/docstrings_heldout.jsonl``
(all 266), joined with end-of-text, cut into consecutive windows so that every token after the first is predicted
exactly once; byte perplexity = exp(total NLL / predicted tokens).

Rows (each quantized with the engine, GPTQ group 128, other linear layers at 4 bits, starved experts RTN):

- ``pmq``: the paper (eps by round-to-nearest, per-layer program, >= one 3-bit and one 2-bit expert per layer);
- ``pmq+``: eps by GPTQ with the 1-bit refit, candidates chosen by loss on the selection split, refit 1-bit;
- ``uniform``: every expert at the target width (targets that are a width only);
- ``hessian``, ``fnorm``, ``random`` (seeds 0 and 1): the paper's program with those costs (RTN eps).
- ``pmq-refit``: the paper's plan quantized with the 1-bit refit (separates the refit from the selection);
  ``uniform-refit``: uniform with the refit (only differs at 1 bit).

Times: calibration, allocation and quantization of pmq and pmq+ in the same run; pmq+'s extra time is reported
as a multiple of one quantization pass. Results go to ``--json`` after every row (atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch

from mcmoe_vl.allocation.allocate import allocate
from mcmoe_vl.allocation.budget import AllocationError
from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.allocation.plus import PlusConfig, allocate_plus
from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.calibration.data import batches_from_ids, token_windows
from mcmoe_vl.data.tokenizer import EOS_ID, encode_bytes
from mcmoe_vl.io import write_json_atomic
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.qlinear import Runtime
from model_adapters import get_adapter

log = logging.getLogger("compare_allocators")
ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "tasks" / "lm_eval" / "data" / "docstrings_heldout.jsonl"


def heldout_windows(seq_len: int) -> torch.Tensor:
    """(n, <= seq_len + 1) consecutive windows over all held-out documents; overlap of one token between windows."""
    ids: list[int] = []
    for line in HELDOUT.read_text(encoding="utf-8").splitlines():
        ids += [EOS_ID] + encode_bytes(json.loads(line)["text"])
    t = torch.tensor(ids, dtype=torch.int64)
    return [t[s : s + seq_len + 1] for s in range(0, t.numel() - 1, seq_len)]


@torch.no_grad()
def byte_ppl(model, windows: list[torch.Tensor], batch: int = 16) -> tuple[float, int]:
    nll, n = 0.0, 0
    full = [w for w in windows if w.numel() == windows[0].numel()]
    rest = [w for w in windows if w.numel() != windows[0].numel()]
    groups = [torch.stack(full[i : i + batch]) for i in range(0, len(full), batch)] + [w[None] for w in rest]
    for x in groups:
        logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                       reduction="sum"))
        n += x[:, 1:].numel()
    return math.exp(nll / n), n


def quantized_ppl(model, plan, fit, windows) -> tuple[float, float]:
    """(perplexity, quantization seconds) of a fresh copy of ``model`` quantized to ``plan``."""
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize_model(m, plan, fit, QuantizeConfig(runtime=Runtime.FAKE, progress=False), adapter=get_adapter(m))
    secs = time.perf_counter() - t0
    return byte_ppl(m, windows)[0], secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "embedded" / "mixtral-tiny"))
    ap.add_argument("--targets", type=float, nargs="+", default=[2.0, 1.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=["pmq", "pmq+", "uniform"])
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--select-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--select-fraction", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", nargs="+", default=None, help="only print the table of saved results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json]
        print(table([r for run in runs for r in run["rows"]], runs[0]["16-bit"]))
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from mcmoe_vl.data.text import stdlib_splits

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    train = torch.tensor(encode_bytes(stdlib_splits().train_text()), dtype=torch.int64)
    cut = int(train.numel() * (1 - args.select_fraction))
    windows = heldout_windows(args.seq_len)
    out: dict = {"command": "benchmarks/compare_allocators.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "json"), "rows": []}
    ppl16, n_tok = byte_ppl(model, windows)
    out["16-bit"] = {"ppl": ppl16, "tokens": n_tok, "documents": len(HELDOUT.read_text().splitlines())}
    log.info("16-bit: %.4f over %d tokens", ppl16, n_tok)

    def save() -> None:
        if args.json:
            write_json_atomic(args.json, out)

    for seed in args.seeds:
        fit = batches_from_ids(token_windows(train[:cut], args.seq_len, args.calib_seqs, seed=seed), 8)
        sel = batches_from_ids(token_windows(train[cut:], args.seq_len, args.select_seqs, seed=seed), 8)
        t0 = time.perf_counter()
        stats_rtn = calibrate(model, fit, CalibrationConfig(), progress=False)
        t_cal_rtn = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats_gptq = calibrate(model, fit, CalibrationConfig(quantizer="gptq", refit_1bit=True), progress=False)
        t_cal_gptq = time.perf_counter() - t0
        out.setdefault("eps", []).append({"seed": seed, "calibration_s": {"rtn": t_cal_rtn, "gptq": t_cal_gptq},
                                          **eps_agreement(stats_rtn, stats_gptq)})
        for target in args.targets:
            for row in args.rows:
                for rseed in ([0, 1] if row == "random" else [None]):
                    rec = {"seed": seed, "target": target, "row": row if rseed is None else f"random{rseed}"}
                    t0 = time.perf_counter()
                    try:
                        if row == "pmq+":
                            plan = allocate_plus(model, stats_gptq, fit, sel,
                                                 AllocationConfig(method="pmq+", target_bits=target), PlusConfig(),
                                                 adapter=get_adapter(model))
                            rec["chosen"] = plan.selection["chosen"]
                            rec["candidates"] = {c["name"]: c["loss"] for c in plan.selection["candidates"]}
                            rec["calibration_s"] = t_cal_gptq
                        else:
                            method = {"pmq-refit": "pmq", "uniform-refit": "uniform"}.get(row, row)
                            cfg = AllocationConfig(method=method, target_bits=target, seed=rseed or 0,
                                                   require_widths=() if method == "uniform" else None)
                            plan = allocate(stats_rtn, cfg)
                            if row.endswith("-refit"):
                                plan = plan.model_copy(update={"refit_1bit": True})
                            rec["calibration_s"] = t_cal_rtn
                    except AllocationError as exc:
                        log.info("seed %d target %g %s: unreachable (%s)", seed, target, row, exc)
                        continue
                    rec["allocation_s"] = time.perf_counter() - t0
                    rec["ppl"], rec["quantize_s"] = quantized_ppl(model, plan, fit, windows)
                    rec["nominal"] = plan.achieved["nominal"]
                    rec["layers"] = [lp.nominal for lp in plan.layers]
                    log.info("seed %d target %g %s: ppl %.4f (%s)", seed, target, rec["row"], rec["ppl"],
                             rec.get("chosen", ""))
                    out["rows"].append(rec)
                    save()
    out["summary"] = summarise(out["rows"])
    save()
    print(table(out["rows"], out["16-bit"]))


ROW_ORDER = ["pmq", "pmq+", "uniform", "uniform-refit", "pmq-refit", "hessian", "fnorm", "random0", "random1"]


def table(rows: list[dict], base: dict) -> str:
    """Markdown: held-out byte perplexity, mean +- sample std over calibration seeds (n seeds), per target."""
    s = summarise(rows)
    targets = sorted({r["target"] for r in rows})
    names = [n for n in ROW_ORDER if any(r["row"] == n for r in rows)]
    lines = [f"16-bit: {base['ppl']:.3f} ({base['tokens']} tokens, {base['documents']} documents)", "",
             "| allocator | " + " | ".join(f"{t:g} bits" for t in targets) + " |",
             "| --- | " + " | ".join("---:" for _ in targets) + " |"]
    for n in names:
        cells = []
        for t in targets:
            v = s.get(f"{t:g} {n}")
            if v is None:
                cells.append("n/a")
            else:
                sd = f" +- {v['std']:.3f}" if v["std"] is not None else ""
                cells.append(f"{v['mean']:.3f}{sd} (n={v['n']})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by calibration seed (pmq+ minus the other row; negative: pmq+ better):", "",
              "| target | pmq+ - pmq | pmq+ - uniform |", "| --- | ---: | ---: |"]
    for t in targets:
        lines.append(f"| {t:g} | {_paired(rows, t, 'pmq')} | {_paired(rows, t, 'uniform')} |")
    lines += ["", "| target | pmq+ chose | pmq time (s) | pmq+ time (s) | pmq+ allocation / one quantization pass |",
              "| --- | --- | ---: | ---: | ---: |"]
    for t in targets:
        a, b = s.get(f"{t:g} pmq"), s.get(f"{t:g} pmq+")
        if a and b:
            lines.append(f"| {t:g} | {', '.join(b['chosen'] or [])} | {a['time_s']:.1f} | {b['time_s']:.1f} | "
                         f"{b['allocation_s'] / a['quantize_s']:.1f}x |")
    return "\n".join(lines)


def _ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=v.__getitem__)
    r = [0.0] * len(v)
    for k, i in enumerate(order):
        r[i] = float(k)
    return r


def eps_agreement(a, b) -> dict:
    """Per width, over all experts of all layers: Spearman rank correlation of eps from RTN (a) and GPTQ (b), and
    the median ratio eps_RTN / eps_GPTQ."""
    out = {}
    for w in a.layers[0].eps:
        x = [v for la in a.layers for v in la.eps[w]]
        y = [v for la in b.layers for v in la.eps[w]]
        rx, ry = _ranks(x), _ranks(y)
        spearman = statistics.correlation(rx, ry)
        out[w] = {"spearman": spearman, "median_ratio": statistics.median(p / q for p, q in zip(x, y) if q > 0),
                  "experts": len(x)}
    return {"eps_rtn_vs_gptq": out}


def _paired(rows: list[dict], target: float, other: str, key: str = "ppl") -> str:
    by = {(r["row"], r["seed"]): r[key] for r in rows if r["target"] == target}
    d = [by[("pmq+", s)] - by[(other, s)] for (n, s) in by if n == "pmq+" and (other, s) in by]
    if not d:
        return "n/a"
    sd = f" +- {statistics.stdev(d):.3f}" if len(d) > 1 else ""
    return f"{statistics.fmean(d):+.3f}{sd} (n={len(d)}, range {min(d):+.3f} to {max(d):+.3f})"


def summarise(rows: list[dict]) -> dict:
    """Mean, sample standard deviation and count of the perplexity per (target, row); mean times."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['target']:g} {r['row']}", []).append(r)
    summary = {}
    for key, rs in sorted(groups.items()):
        p = [r["ppl"] for r in rs]
        summary[key] = {"mean": statistics.fmean(p), "std": statistics.stdev(p) if len(p) > 1 else None,
                        "n": len(p), "min": min(p), "max": max(p),
                        "time_s": statistics.fmean(r["calibration_s"] + r["allocation_s"] + r["quantize_s"]
                                                   for r in rs),
                        "allocation_s": statistics.fmean(r["allocation_s"] for r in rs),
                        "quantize_s": statistics.fmean(r["quantize_s"] for r in rs),
                        "chosen": sorted({r["chosen"] for r in rs if "chosen" in r}) or None}
    return summary


if __name__ == "__main__":
    main()
