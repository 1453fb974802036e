"""Quality measurements of the embedded models on the shipped held-out samples (METHOD.md section 10).

- :func:`byte_windows`, :func:`lm_stats`: next-byte perplexity and per-layer top-k expert frequencies of a
  Mixtral-style model on windows of a shipped JSON-lines file; :func:`unigram_ppl`: the training unigram's
  perplexity on the same tokens.
- :func:`vqa_exact_match`: greedy exact match of a DeepSeek-VL2 model on held-out image questions, computed
  teacher-forced (every answer token and the eos is the argmax, which is exactly when greedy decoding returns the
  answer and stops), optionally with blank images.

``python -m mcmoe_vl.data.quality`` prints all the numbers recorded in ``docs/embedded.md`` as JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .lm_tasks import UNIGRAM_SOURCE_COUNTS
from .tasks import LM_EVAL_TASKS_DIR, LMMS_EVAL_TASKS_DIR
from .tokenizer import EOS_ID

VQA_CHANCE = {"colour": 1 / 8, "shape": 1 / 5, "count": 1 / 5, "position": 1 / 4, "digit": 1 / 10, "reading": 1 / 10}


def byte_windows(name: str, seq_len: int = 256, num: int = 24, data_dir: Path = LM_EVAL_TASKS_DIR / "data"
                 ) -> torch.Tensor:
    """(num, seq_len + 1) byte windows spread evenly over a shipped file, documents joined by end-of-text."""
    docs = [json.loads(line)["text"] for line in (data_dir / name).read_text(encoding="utf-8").splitlines()]
    ids: list[int] = []
    for d in docs:
        ids += [EOS_ID] + list(d.encode("utf-8"))
    t = torch.tensor(ids)
    step = (t.numel() - seq_len - 1) // num
    if step < 1:
        raise ValueError(f"{name} has too few tokens for {num} windows of {seq_len}")
    return torch.stack([t[i * step : i * step + seq_len + 1] for i in range(num)])


@torch.no_grad()
def lm_stats(model: Any, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(perplexity of x[:, 1:] given the prefix, top-k expert frequencies per layer (L, E), summing to 1)."""
    out = model(input_ids=x[:, :-1], output_router_logits=True)
    nll = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                            x[:, 1:].reshape(-1)).item()
    k = model.config.num_experts_per_tok
    freqs = []
    for lg in out.router_logits:  # (T, E)
        sel = torch.zeros_like(lg).scatter_(1, lg.topk(k, dim=-1).indices, 1.0)
        freqs.append(sel.mean(0) / k)
    return math.exp(nll), torch.stack(freqs)


IN_DOMAIN, OUT_OF_DOMAIN = "source_heldout.jsonl", "prose_ood.jsonl"  # the language model's held-out splits


def unigram_ppl(x: torch.Tensor, counts_file: Path = LM_EVAL_TASKS_DIR / "data" / UNIGRAM_SOURCE_COUNTS) -> float:
    """Perplexity of the add-one unigram model of the training split (the source corpus's) on x[:, 1:]."""
    counts = torch.tensor(json.loads(counts_file.read_text())["counts"], dtype=torch.float64) + 1
    logp = counts.log() - counts.sum().log()
    return math.exp(-logp[x[:, 1:]].mean().item())


def vqa_rows(task: str, n: int, data_dir: Path = LMMS_EVAL_TASKS_DIR / "data") -> list[dict[str, Any]]:
    """The first ``n`` shipped held-out samples of ``task``."""
    lines = (data_dir / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


@torch.no_grad()
def vqa_exact_match(model: Any, processor: Any, rows: list[dict[str, Any]], *, blank: bool = False,
                    batch_size: int = 48) -> float:
    """Greedy exact match over ``rows`` (teacher-forced, see the module docstring)."""
    from .images import blank_like, image_from_b64

    hits = 0
    for start in range(0, len(rows), batch_size):
        samples = []
        for r in rows[start : start + batch_size]:
            img = image_from_b64(r["image"])
            img = blank_like(img) if blank else img
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
        hits += int(((logits.argmax(-1) == tgt) | (tgt == -100)).all(-1).sum())
    return hits / len(rows)


def measure(n_vqa: int = 200, lm_windows: int = 64) -> dict[str, Any]:
    """All recorded quality numbers of both embedded models."""
    from .embedded import load_embedded_mixtral, load_embedded_vlm

    model, _ = load_embedded_mixtral()
    x_in, x_ood = byte_windows(IN_DOMAIN, num=lm_windows), byte_windows(OUT_OF_DOMAIN, num=lm_windows)
    ppl_in, f_in = lm_stats(model, x_in)
    ppl_ood, f_ood = lm_stats(model, x_ood)
    out: dict[str, Any] = {"mixtral_tiny": {
        "heldout_ppl": ppl_in, "ood_ppl": ppl_ood, "unigram_heldout_ppl": unigram_ppl(x_in),
        "routing_max_over_min": (f_in.max(1).values / f_in.min(1).values).tolist(),
        "routing_min_share": f_in.min(1).values.tolist(), "routing_max_share": f_in.max(1).values.tolist(),
        "routing_ood_min_share": f_ood.min(1).values.tolist(),
        "routing_shift_tv": (0.5 * (f_in - f_ood).abs().sum(1)).tolist(),
        "windows": f"{lm_windows} x 256 bytes"}}
    vlm, processor = load_embedded_vlm()
    acc = {t: vqa_exact_match(vlm, processor, vqa_rows(t, n_vqa)) for t in VQA_CHANCE}
    blank = {t: vqa_exact_match(vlm, processor, vqa_rows(t, n_vqa), blank=True) for t in VQA_CHANCE}
    out["deepseek_vl2_tiny"] = {"exact_match": acc, "blank_image_exact_match": blank, "chance": VQA_CHANCE,
                                "samples_per_task": n_vqa}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(measure(), indent=2))
