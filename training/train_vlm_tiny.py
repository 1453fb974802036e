"""Train the embedded DeepSeek-VL2-architecture vision-language model on offline image questions (CPU).

Recipe (seeded; the log records every hyper-parameter and the held-out accuracy along the way):

* data: :func:`mcmoe_vl.data.images.vqa_samples` train split of the six tasks (colour, shape, count, position,
  digit, reading), a pool of ``--pool`` samples per task, batches drawn with a seeded generator (tasks mixed);
* prompt: exactly what the lmms-eval model sends, ``<|User|>: <image>\\n{question}\\n\\n<|Assistant|>: {answer}``
  + eos (DeepSeek-VL2's ``deepseek`` template); the loss is on the answer tokens and eos only;
* model: the project's DeepSeek-VL2 port (:func:`model_adapters.deepseek_vl2.model_from_config`): SigLIP ViT
  (56-px tiles, 7-px patches, width 64, 2 layers), 2 x 2 downsampling MLP projector, DeepSeek-V2 MoE language model
  (hidden 128, 4 layers, first layer dense, 8 routed experts top-4 + 1 shared, expert matrices 128 x 128),
  multi-head attention and greedy softmax routing like ``deepseek-vl2-tiny``;
* tokenizer: byte-level BPE with DeepSeek-VL2's special tokens (:func:`model_adapters.deepseek_vl2.tiny.tiny_tokenizer`)
  trained on the questions and answers;
* loss: cross-entropy + ``aux_coef`` x the per-layer Switch load-balancing loss (E * sum_e f_e P_e);
* AdamW, warm-up then cosine decay, gradient clipping 1.0;
* stages: ``--init <dir> --stage 2`` continues from a saved checkpoint with a fresh schedule and batch order (the
  committed model is stage 1 then stage 2, see ``docs/embedded.md`` for the exact commands).

Run: ``OMP_NUM_THREADS=2 .venv/bin/python training/train_vlm_tiny.py --out embedded/deepseek-vl2-tiny``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcmoe_vl.data.images import CLASSES, IMAGE_SIZE, QUESTIONS, VQATask, vqa_samples  # noqa: E402
from model_adapters.deepseek_vl2 import load_official, model_from_config, save_official  # noqa: E402
from model_adapters.deepseek_vl2.processing import DeepseekVL2Processor  # noqa: E402
from model_adapters.deepseek_vl2.tiny import tiny_tokenizer  # noqa: E402

log = logging.getLogger("train_vlm_tiny")


def tokenizer_corpus() -> list[str]:
    """The texts the tokenizer's merges are learnt from: the chat template, questions and answers."""
    out = [f"<|User|>: <image>\n{q}\n\n<|Assistant|>: " for q in QUESTIONS.values()]
    for task in VQATask:
        out += [f": {a}" for a in CLASSES[task]] * 4
    return out


def official_config(vocab_size: int) -> dict:
    """The tiny model's config in DeepSeek-VL2's official ``config.json`` layout."""
    return {
        "model_type": "deepseek_vl_v2", "tile_tag": "2D", "global_view_pos": "head",
        "candidate_resolutions": [[IMAGE_SIZE, IMAGE_SIZE]],
        "vision_config": {
            "model_name": "siglip_so400m_patch14_384", "image_size": IMAGE_SIZE, "patch_size": 7, "width": 64,
            "layers": 2, "heads": 4, "mlp_ratio": 3.7362, "global_pool": "map", "ignore_head": True,
            "class_token": False, "num_classes": 0, "model_type": "vision",
        },
        "projector_config": {
            "projector_type": "downsample_mlp_gelu", "input_dim": 64, "n_embed": 128, "depth": 2, "mlp_ratio": 1,
            "downsample_ratio": 2, "model_type": "mlp_projector",
        },
        "language_config": {
            "vocab_size": vocab_size, "max_position_embeddings": 256, "hidden_size": 128, "intermediate_size": 256,
            "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 4,
            "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1,
            "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False, "use_mla": False,
            "kv_lora_rank": None, "q_lora_rank": None, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "bos_token_id": 0, "eos_token_id": 1, "model_type": "deepseek_v2",
        },
    }


def conversation(question: str, answer: str | None) -> list[dict]:
    conv = [{"role": "user", "content": f"<image>\n{question}"}]
    if answer is not None:
        conv.append({"role": "assistant", "content": answer})
    return conv


def encode(processor: DeepseekVL2Processor, samples) -> dict[str, torch.Tensor]:
    """A training batch with labels on the answer tokens and eos only."""
    processed = []
    for s in samples:
        full = processor.process_one(conversation(s.question, s.answer), [s.image], inference=False)
        n_prompt = len(processor.process_one(conversation(s.question, None), [s.image]).input_ids)
        full.target_ids = full.input_ids.clone()
        full.target_ids[:n_prompt] = -100
        processed.append(full)
    return processor.collate(processed)


class RouterTap:
    """Forward hooks on every MoE gate keeping the router logits (T, E) of the last forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for n, m in model.named_modules()
                        if n.endswith("mlp.gate")]
        if not self.handles:
            raise RuntimeError("no MoE gates found")

    def _hook(self, module, inputs, output) -> None:
        self.logits.append(output[0])

    def pop(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out


def balance_loss(router_logits: list[torch.Tensor], top_k: int,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer load-balancing loss over real (non-pad) tokens, mean over layers; frequencies (L, E)."""
    losses, freqs = [], []
    for logits in router_logits:  # (T, E)
        probs = logits.float().softmax(-1)[mask]
        E = probs.shape[-1]
        sel = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        f = sel.mean(0) / top_k
        losses.append(E * (f * probs.mean(0)).sum())
        freqs.append(f.detach())
    return torch.stack(losses).mean(), torch.stack(freqs)


@torch.no_grad()
def answer_accuracy(model, processor, samples) -> float:
    """Teacher-forced exact match: every answer token (and eos) is the argmax."""
    model.eval()
    batch = encode(processor, samples)
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]
    tgt = labels[:, 1:]
    ok = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(-1)
    model.train()
    return ok.float().mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "embedded" / "deepseek-vl2-tiny"))
    ap.add_argument("--log", default=str(ROOT / "training" / "logs" / "vlm_tiny.log"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pool", type=int, default=3000, help="training samples per task")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--init", default=None,
                    help="continue from this checkpoint directory (its weights and tokenizer): a further stage")
    ap.add_argument("--stage", type=int, default=1, help="stage number: seeds the batch order of a continued run")
    ap.add_argument("--stop-step", type=int, default=None,
                    help="end at this step (the schedule still spans --steps); reproduces a --max-minutes stop")
    ap.add_argument("--task-weights", default="",
                    help="comma-separated task=weight for the task mix (default: every task weight 1), e.g. reading=4")
    ap.add_argument("--heldout", type=int, default=24, help="held-out samples per task for the evaluations")
    ap.add_argument("--max-minutes", type=float, default=70,
                    help="wall-clock budget: end early (logging the step reached) when exceeded")
    args = ap.parse_args(argv)

    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(args.log, mode="w"), logging.StreamHandler()])
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    log.info("args %s", json.dumps(vars(args)))
    log.info("python %s torch %s threads %d", sys.version.split()[0], torch.__version__, torch.get_num_threads())

    if args.init:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.init)
        cfg = json.loads((Path(args.init) / "config.json").read_text(encoding="utf-8"))
        model = load_official(args.init, dtype=torch.float32)
        log.info("continuing from %s", args.init)
    else:
        tok = tiny_tokenizer(vocab_size=512, corpus=tokenizer_corpus())
        cfg = official_config(vocab_size=len(tok))
        model = model_from_config(cfg, seed=args.seed)
    vocab = len(tok)
    processor = DeepseekVL2Processor.from_config(tok, model)
    n_par = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    log.info("vocab %d, params %d, routed experts %d (%.1f%%)", vocab, n_par, n_exp, 100 * n_exp / n_par)
    for task in VQATask:
        ids = [tok.encode(f": {a}", add_special_tokens=False) for a in CLASSES[task]]
        log.info("answer tokens %s: %s", task.value, ids)

    t0 = time.time()
    tasks = list(VQATask)
    pool = {t: vqa_samples(t, "train", args.pool, seed=args.seed) for t in tasks}
    held = {t: vqa_samples(t, "heldout", args.heldout, seed=args.seed) for t in tasks}
    weights = {t: 1.0 for t in tasks}
    for item in filter(None, args.task_weights.split(",")):
        name, _, w = item.partition("=")
        weights[VQATask(name.strip())] = float(w)
    uniform_mix = len(set(weights.values())) == 1  # the committed stages 1-3 drew tasks with rng.choice
    log.info("data pools ready (%.1fs)", time.time() - t0)

    top_k = cfg["language_config"]["num_experts_per_tok"]
    tap = RouterTap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    rng = random.Random(args.seed if args.stage == 1 else f"{args.seed}:{args.stage}")
    model.train()
    t_train = time.time()
    for step in range(1, args.steps + 1):
        samples = [rng.choice(pool[rng.choice(tasks) if uniform_mix else rng.choices(
            tasks, weights=[weights[t] for t in tasks])[0]]) for _ in range(args.batch)]
        batch = encode(processor, samples)
        labels = batch.pop("labels")
        tap.pop()
        logits = model(**batch).logits
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
        aux, freqs = balance_loss(tap.pop(), top_k, batch["attention_mask"].reshape(-1).bool())
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == 1:
            ratio = (freqs.max(1).values / freqs.min(1).values.clamp_min(1e-9)).tolist()
            log.info("step %d ce %.4f aux %.4f lr %.2e max/min %s %.1fs", step, ce.item(), aux.item(),
                     sched.get_last_lr()[0], [round(r, 1) for r in ratio], time.time() - t_train)
        last = step == args.steps or step == args.stop_step or (time.time() - t_train) / 60 > args.max_minutes
        if step % args.eval_every == 0 or last:
            accs = {t.value: round(answer_accuracy(model, processor, held[t]), 3) for t in tasks}
            tap.pop()
            log.info("eval step %d held-out teacher-forced exact match %s", step, json.dumps(accs))
        if last:
            break
    train_s = time.time() - t_train
    log.info("trained %d of %d scheduled steps in %.1f s (reproduce: --steps %d --stop-step %d)", step, args.steps,
             train_s, args.steps, step)
    for h in tap.handles:
        h.remove()

    out = Path(args.out)
    model.eval()
    model.to(getattr(torch, args.save_dtype))
    save_official(model, out)
    tok.save_pretrained(str(out))
    meta = {"seed": args.seed, "stage": args.stage, "init": args.init, "steps": step, "scheduled_steps": args.steps, "train_seconds": round(train_s, 1),
            "stored_dtype": args.save_dtype, "params": n_par, "routed_expert_params": n_exp, "args": vars(args)}
    (out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("saved to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
