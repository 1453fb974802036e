"""How much uniform quantization hurts an embedded model: 16-bit against GPTQ and round-to-nearest at 3 / 2 / 1 bits.

    .venv/bin/python benchmarks/regime.py --json runs/regime_mixtral.json                 # the tiny Mixtral
    .venv/bin/python benchmarks/regime.py --vlm --json runs/regime_vlm.json               # the tiny DeepSeek-VL2

Only the routed experts are quantized (group 128; attention, router, shared experts and everything else stay at
16 bits), with the engine (``quantize_model``): GPTQ on ``--calib-seqs`` calibration windows of the training
distribution, and round-to-nearest through the engine's own fallback path (``min_tokens`` above any routed count,
so every expert is rounded instead of solved). 1-bit rows use the engine's default binary scales.

Language model: byte perplexity of every document of each evaluation file (``--eval name=path``; by default the
in-domain and out-of-domain files shipped under ``tasks/lm_eval/data``), each document prefixed with end-of-text
and cut into consecutive ``--seq-len`` windows, so that every byte is predicted once; perplexity = exp(total NLL /
bytes). Intervals: percentile bootstrap over documents (``--boot`` resamples); the ratio to 16-bit is paired
(the same resampled documents in both). Vision-language model: greedy exact match on the shipped held-out image
questions (``--vqa-rows`` per task), Wilson interval per task and a paired bootstrap of the mean over tasks.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mcmoe_vl.data.tokenizer import EOS_ID  # noqa: E402
from mcmoe_vl.io import write_json_atomic  # noqa: E402
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model  # noqa: E402
from mcmoe_vl.quant.plan import BitPlan  # noqa: E402
from mcmoe_vl.quant.qlinear import Runtime  # noqa: E402

log = logging.getLogger("regime")
LM_DATA = ROOT / "tasks" / "lm_eval" / "data"
DEFAULT_EVALS = ("source=source_heldout.jsonl", "prose=prose_ood.jsonl", "docstrings=docstrings_heldout.jsonl",
                 "code=code_heldout.jsonl")


def doc_windows(path: Path, seq_len: int) -> list[list[torch.Tensor]]:
    """Per document: consecutive windows (overlap one token) over [EOS] + its UTF-8 bytes."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        ids = torch.tensor([EOS_ID] + list(json.loads(line)["text"].encode("utf-8")), dtype=torch.int64)
        out.append([ids[s : s + seq_len + 1] for s in range(0, ids.numel() - 1, seq_len)])
    return out


@torch.no_grad()
def doc_nll(model, docs: list[list[torch.Tensor]], batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(total NLL, predicted bytes) per document."""
    items = [(d, w) for d, ws in enumerate(docs) for w in ws]
    items.sort(key=lambda it: it[1].numel())
    nll, cnt = np.zeros(len(docs)), np.zeros(len(docs))
    i = 0
    while i < len(items):
        n = items[i][1].numel()
        group = [it for it in items[i : i + batch] if it[1].numel() == n]
        x = torch.stack([w for _, w in group])
        logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(1)
        for (d, _), v in zip(group, tok.tolist()):
            nll[d] += v
            cnt[d] += n - 1
        i += len(group)
    return nll, cnt


def boot_idx(n_docs: int, n_boot: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_docs, size=(n_boot, n_docs))


def ppl_summary(nll: np.ndarray, cnt: np.ndarray, idx: np.ndarray, base: tuple | None = None) -> dict:
    ppl = math.exp(nll.sum() / cnt.sum())
    bs = np.exp(nll[idx].sum(1) / cnt[idx].sum(1))
    out = {"ppl": ppl, "ci": [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))],
           "documents": int(len(nll)), "bytes": int(cnt.sum())}
    if base is not None:
        b_nll, b_cnt = base
        ratio = bs / np.exp(b_nll[idx].sum(1) / b_cnt[idx].sum(1))
        out["ratio"] = ppl / math.exp(b_nll.sum() / b_cnt.sum())
        out["ratio_ci"] = [float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))]
    return out


def expert_plan(model, bits: int, model_type: str) -> BitPlan:
    """Every routed expert at ``bits``; every other module left at 16 bits."""
    from model_adapters import get_adapter

    layers = list(get_adapter(model).moe_layers(model))
    return BitPlan.from_experts({la.index: [bits] * la.num_experts for la in layers}, model_type=model_type,
                                allocator=f"uniform-experts-{bits}", other_bits=16, shared_experts_bits=16)


def quantized(model, bits: int, method: str, fit, model_type: str, adapter=None):
    m = copy.deepcopy(model)
    cfg = QuantizeConfig(runtime=Runtime.FAKE, progress=False, quantize_router=False,
                         min_tokens=10**12 if method == "rtn" else 16)
    t0 = time.perf_counter()
    from model_adapters import get_adapter

    quantize_model(m, expert_plan(m, bits, model_type), fit, cfg, adapter=adapter or get_adapter(m))
    return m, time.perf_counter() - t0


def text_calibration(source: str, seq_len: int, num: int, seed: int) -> list[dict]:
    from mcmoe_vl.calibration.data import batches_from_ids, token_windows

    if source == "corpus":
        from mcmoe_vl.data.corpus import build_corpus

        d = ROOT / ".cache" / "corpus"
        if not (d / "manifest.json").exists():
            build_corpus(d)
        ids = torch.from_numpy(np.fromfile(d / "train.bin", dtype=np.uint16).astype(np.int64))
    else:
        from mcmoe_vl.data import calibration_token_ids

        ids = calibration_token_ids(source.split(":", 1)[1] if source.startswith("embedded:") else source)
    return batches_from_ids(token_windows(ids, seq_len, num, seed=seed), 8)


def run_text(args) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    evals = {}
    for spec in args.eval or DEFAULT_EVALS:
        name, _, path = spec.partition("=")
        p = Path(path) if Path(path).is_absolute() else LM_DATA / path
        if p.exists():
            evals[name] = doc_windows(p, args.seq_len)
        elif args.eval:
            raise SystemExit(f"--eval {spec}: {p} does not exist")
    if not evals:
        raise SystemExit(f"no evaluation file found under {LM_DATA}; pass --eval name=path")
    idx = {k: boot_idx(len(v), args.boot) for k, v in evals.items()}
    fit = text_calibration(args.calib, args.seq_len, args.calib_seqs, args.seed)
    meta = json.loads((Path(args.model) / "training_meta.json").read_text()) if (
        Path(args.model) / "training_meta.json").exists() else {}
    out = {"model": args.model, "tokens_per_param": meta.get("tokens_per_param"), "calibration": {
        "source": args.calib, "sequences": args.calib_seqs, "seq_len": args.seq_len, "seed": args.seed}, "rows": []}
    base = {k: doc_nll(model, v) for k, v in evals.items()}
    out["rows"].append({"row": "16-bit", **{k: ppl_summary(*base[k], idx[k]) for k in evals}})
    log.info("16-bit %s", {k: round(out["rows"][-1][k]["ppl"], 4) for k in evals})
    for method in args.methods:
        for bits in args.bits:
            m, secs = quantized(model, bits, method, fit, model.config.model_type)
            rec = {"row": f"{method} {bits}-bit", "quantize_s": secs}
            for k, v in evals.items():
                rec[k] = ppl_summary(*doc_nll(m, v), idx[k], base=base[k])
            out["rows"].append(rec)
            log.info("%s %s", rec["row"], {k: (round(rec[k]["ppl"], 4), round(rec[k]["ratio"], 4)) for k in evals})
            if args.json:
                write_json_atomic(args.json, out)
    return out


def run_vlm(args) -> dict:
    from mcmoe_vl.data.embedded import load_embedded_vlm
    from mcmoe_vl.data.images import VQATask, vqa_samples
    from mcmoe_vl.data.quality import VQA_CHANCE, vqa_rows
    from model_adapters.deepseek_vl2.adapter import ImageTextSample, image_text_batches

    model, processor = load_embedded_vlm(path=args.model) if args.model_given else load_embedded_vlm()
    tasks = list(VQA_CHANCE)
    rows = {t: vqa_rows(t, args.vqa_rows) for t in tasks}
    per = -(-args.calib_seqs // len(VQATask))
    pools = [vqa_samples(t, "train", per, seed=args.seed) for t in VQATask]
    samples = [ImageTextSample(text=s.question, images=[s.image], answer=s.answer)
               for i in range(per) for pool in pools for s in pool[i : i + 1]][: args.calib_seqs]
    fit = list(image_text_batches(processor, samples, batch_size=8))

    def hits(m) -> dict[str, np.ndarray]:
        return {t: per_item_hits(m, processor, rows[t]) for t in tasks}

    base = hits(model)
    rng = np.random.default_rng(0)
    idx = {t: rng.integers(0, len(rows[t]), size=(args.boot, len(rows[t]))) for t in tasks}

    def summary(h: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None) -> dict:
        out = {t: {"accuracy": float(h[t].mean()), "ci": wilson(int(h[t].sum()), len(h[t])), "n": len(h[t])}
               for t in tasks}
        mean_bs = np.mean([h[t][idx[t]].mean(1) for t in tasks], axis=0)
        out["mean"] = {"accuracy": float(np.mean([h[t].mean() for t in tasks])),
                       "ci": [float(np.percentile(mean_bs, 2.5)), float(np.percentile(mean_bs, 97.5))]}
        if ref is not None:
            diff = mean_bs - np.mean([ref[t][idx[t]].mean(1) for t in tasks], axis=0)
            out["mean"]["diff"] = out["mean"]["accuracy"] - float(np.mean([ref[t].mean() for t in tasks]))
            out["mean"]["diff_ci"] = [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]
        return out

    out = {"model": args.model if args.model_given else "embedded/deepseek-vl2-tiny", "vqa_rows": args.vqa_rows,
           "chance": VQA_CHANCE, "calibration": {"samples": len(samples), "seed": args.seed}, "rows": []}
    out["rows"].append({"row": "16-bit", **summary(base, None)})
    log.info("16-bit %s", {t: out["rows"][-1][t]["accuracy"] for t in tasks})
    for method in args.methods:
        for bits in args.bits:
            m, secs = quantized(model, bits, method, fit, "deepseek_vl_v2")
            rec = {"row": f"{method} {bits}-bit", "quantize_s": secs, **summary(hits(m), base)}
            out["rows"].append(rec)
            log.info("%s mean %.3f (diff %.3f)", rec["row"], rec["mean"]["accuracy"], rec["mean"]["diff"])
            if args.json:
                write_json_atomic(args.json, out)
    return out


@torch.no_grad()
def per_item_hits(model, processor, rows, batch_size: int = 48) -> np.ndarray:
    from mcmoe_vl.data.quality import vqa_exact_match

    return np.array([vqa_exact_match(model, processor, [r], batch_size=1) for r in rows]) if len(rows) < 2 else \
        np.concatenate([_batch_hits(model, processor, rows[i : i + batch_size]) for i in range(0, len(rows),
                                                                                              batch_size)])


def _batch_hits(model, processor, rows) -> np.ndarray:
    from mcmoe_vl.data.images import image_from_b64

    samples = []
    for r in rows:
        img = image_from_b64(r["image"])
        conv = [{"role": "user", "content": f"<image>\n{r['question']}"},
                {"role": "assistant", "content": r["answer"]}]
        full = processor.process_one(conv, [img], inference=False)
        n_prompt = len(processor.process_one(conv[:1], [img]).input_ids)
        full.target_ids = full.input_ids.clone()
        full.target_ids[:n_prompt] = -100
        samples.append(full)
    batch = processor.collate(samples)
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]
    tgt = labels[:, 1:]
    return ((logits.argmax(-1) == tgt) | (tgt == -100)).all(-1).numpy().astype(np.float64)


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def table(out: dict) -> str:
    rows = out["rows"]
    if "mean" in rows[0]:
        tasks = [k for k in rows[0] if k not in ("row", "mean", "quantize_s")]
        lines = ["| row | " + " | ".join(tasks) + " | mean (95% CI) | vs 16-bit (95% CI) |",
                 "|---" * (len(tasks) + 3) + "|"]
        for r in rows:
            diff = (f"{100 * r['mean']['diff']:+.1f} pts [{100 * r['mean']['diff_ci'][0]:+.1f}, "
                    f"{100 * r['mean']['diff_ci'][1]:+.1f}]") if "diff" in r["mean"] else "-"
            lines.append(f"| {r['row']} | " + " | ".join(f"{r[t]['accuracy']:.3f}" for t in tasks) +
                         f" | {r['mean']['accuracy']:.3f} [{r['mean']['ci'][0]:.3f}, {r['mean']['ci'][1]:.3f}] | "
                         f"{diff} |")
        return "\n".join(lines)
    sets = [k for k in rows[0] if k not in ("row", "quantize_s")]
    lines = ["| row | " + " | ".join(f"{s} ppl (95% CI) | {s} vs 16-bit" for s in sets) + " |",
             "|---" * (1 + 2 * len(sets)) + "|"]
    for r in rows:
        cells = []
        for s in sets:
            v = r[s]
            cells.append(f"{v['ppl']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]")
            cells.append(f"{100 * (v['ratio'] - 1):+.1f}% [{100 * (v['ratio_ci'][0] - 1):+.1f}, "
                         f"{100 * (v['ratio_ci'][1] - 1):+.1f}]" if "ratio" in v else "-")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    docs = ", ".join(f"{s}: {rows[0][s]['documents']} documents, {rows[0][s]['bytes']} bytes" for s in sets)
    return "\n".join(lines) + f"\n\n({docs})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--vlm", action="store_true", help="measure the vision-language model on the image tasks")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2, 1], choices=[1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=["gptq", "rtn"], choices=["gptq", "rtn"])
    ap.add_argument("--eval", nargs="+", default=None, metavar="NAME=PATH",
                    help=f"evaluation files (relative to {LM_DATA.relative_to(ROOT)}); default {' '.join(DEFAULT_EVALS)}"
                         " where present")
    ap.add_argument("--calib", default="corpus",
                    help="calibration text: 'corpus' (the training split of mcmoe_vl.data.corpus) or embedded:train")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vqa-rows", type=int, default=200)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.model_given = args.model is not None
    if not args.vlm and args.model is None:
        args.model = str(ROOT / "embedded" / "mixtral-tiny")
    out = run_vlm(args) if args.vlm else run_text(args)
    out["command"] = "benchmarks/regime.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:
        write_json_atomic(args.json, out)
    print(table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
