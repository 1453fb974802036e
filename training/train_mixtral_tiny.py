"""Train the embedded Mixtral-architecture language model on the machine's Python sources (CPU, resumable stages).

Recipe (everything seeded; the log records the corpus manifest, the Python version and every hyper-parameter):

* data: :mod:`mcmoe_vl.data.corpus` (every Python file of the standard library and the locked environment, tests
  dropped, deduplicated, 3% held out by a hash of the path, the text tasks' held-out modules reserved), encoded as
  bytes with an end-of-text token between files; random windows of ``seq_len`` + 1 tokens (seeded generator);
* model: transformers ``MixtralForCausalLM``, hidden 128, 4 layers, 8 experts top-2, expert intermediate 256
  (every expert matrix is at least 128 x 128), byte vocabulary of 260;
* loss: next-token cross-entropy + ``aux_coef`` x the Switch-Transformer load-balancing loss computed *per layer*
  (E * sum_e f_e P_e, averaged over layers; f_e = share of the top-k slots given to expert e, P_e = its mean
  router probability), so that no layer can hide a dead expert behind another layer's excess;
* AdamW, linear warm-up then cosine decay, gradient clipping 1.0;
* stages: every ``--checkpoint-minutes`` (and when ``--max-minutes`` ends a stage) the model, optimizer, schedule
  and generator states go to ``--checkpoint`` atomically; running the same command again resumes from it and
  continues the same schedule and batch order. The first steps' losses are logged exactly (``repr``) so that a
  rerun from the seed can be compared bit for bit: with the logged thread count and MKL's code path pinned to
  ``MKL_CBWR`` (set below before torch loads; MKL's AVX-512 and AVX2 paths round differently, so an unpinned run
  reproduces only on the same kind of CPU).

Run (about 20 training tokens per parameter; stages of at most ``--max-minutes``; repeat until it saves):
``OMP_NUM_THREADS=2 .venv/bin/python training/train_mixtral_tiny.py --out embedded/mixtral-tiny``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

# MKL chooses its code path from the CPU; pinning it to AVX2 (present on every supported x86 machine) makes the
# losses reproducible across AVX2 and AVX-512 machines. It must be set before MKL initialises.
os.environ.setdefault("MKL_CBWR", "AVX2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcmoe_vl.data.corpus import build_corpus, load_jsonl  # noqa: E402
from mcmoe_vl.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, byte_tokenizer  # noqa: E402

log = logging.getLogger("train_mixtral_tiny")


def model_config(max_len: int):  # -> MixtralConfig
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_len,
        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.003, output_router_logits=False,
        rope_theta=10000.0, tie_word_embeddings=False, sliding_window=None, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=0.02, rms_norm_eps=1e-5)


def stream(docs: list[str]) -> torch.Tensor:
    """Bytes of the documents, each followed by the end-of-text token: (N,) int64."""
    out: list[int] = []
    for d in docs:
        out.extend(d.encode("utf-8"))
        out.append(EOS_ID)
    return torch.tensor(out, dtype=torch.int64)


def batch(data: np.ndarray, bs: int, seq: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.size - seq - 1, (bs,), generator=g)
    return torch.from_numpy(np.stack([data[s : s + seq + 1] for s in starts.tolist()]).astype(np.int64))  # (B, S+1)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer load-balancing loss (mean over layers) and the per-layer top-k frequencies (L, E)."""
    losses, freqs = [], []
    for logits in router_logits:  # (T, E)
        probs = logits.float().softmax(-1)
        E = probs.shape[-1]
        sel = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)  # (T, E)
        f = sel.mean(0) / top_k  # (E,) shares of the top-k slots
        losses.append(E * (f * probs.mean(0)).sum())
        freqs.append(f.detach())
    return torch.stack(losses).mean(), torch.stack(freqs)


@torch.no_grad()
def evaluate(model, data: np.ndarray, seq: int, n: int) -> float:
    """Mean next-token loss (nats/byte) on ``n`` fixed non-overlapping windows."""
    model.eval()
    tot, cnt = 0.0, 0
    step = max(1, (len(data) - seq - 1) // n)
    for i in range(n):
        x = torch.from_numpy(np.asarray(data[i * step : i * step + seq + 1], dtype=np.int64))[None]
        logits = model(input_ids=x[:, :-1]).logits
        tot += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
        cnt += seq
    model.train()
    return tot / cnt


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "embedded" / "mixtral-tiny"))
    ap.add_argument("--log", default=str(ROOT / "training" / "logs" / "mixtral_tiny.log"))
    ap.add_argument("--corpus", default=str(ROOT / ".cache" / "corpus"),
                    help="corpus directory (built by mcmoe_vl.data.corpus when absent)")
    ap.add_argument("--checkpoint", default=str(ROOT / "training" / "checkpoints" / "mixtral_tiny.pt"),
                    help="resumable training state (model, optimizer, schedule, generator); an existing one is "
                         "resumed. The default path is tracked, so that a stage can be committed and resumed on "
                         "another machine; it is deleted when the model is saved")
    ap.add_argument("--steps", type=int, default=17000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--exact-steps", type=int, default=5, help="log the first N losses exactly (repr)")
    ap.add_argument("--stop-step", type=int, default=None,
                    help="end at this step (the schedule still spans --steps) without saving the model")
    ap.add_argument("--max-minutes", type=float, default=170,
                    help="wall-clock budget of this stage: checkpoint and stop when exceeded (rerun to resume)")
    ap.add_argument("--checkpoint-minutes", type=float, default=10)
    ap.add_argument("--export-checkpoint", default=None, metavar="STATE",
                    help="only write the model of a training state file (a stage's checkpoint) to --out, as float32, "
                         "for measurements along the way (benchmarks/regime.py --model <out>)")
    return ap.parse_args(argv)


def export_checkpoint(state_file: str | Path, out: str | Path, seq_len: int, batch: int) -> int:
    """Save the model of a training state as a Hugging Face directory (float32) with the byte tokenizer; returns
    the step it was taken at (recorded in ``training_meta.json``)."""
    from transformers import MixtralForCausalLM

    state = torch.load(state_file, weights_only=False)
    model = MixtralForCausalLM(model_config(seq_len))
    model.load_state_dict(state["model"])
    out = Path(out)
    model.eval().save_pretrained(str(out), safe_serialization=True)
    byte_tokenizer(model_max_length=seq_len).save_pretrained(str(out))
    n_par = sum(p.numel() for p in model.parameters())
    meta = {"step": state["step"], "state": str(state_file), "params": n_par,
            "tokens_per_param": round(state["step"] * batch * seq_len / n_par, 2)}
    (out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return state["step"]


def _save_state(path: Path, model, opt, sched, g: torch.Generator, step: int, elapsed: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "generator": g.get_state(), "step": step, "elapsed": elapsed}, tmp)
    tmp.replace(path)


def _docs_stream(docs) -> np.ndarray:
    return stream([d.text for d in docs]).numpy()


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.export_checkpoint:
        step = export_checkpoint(args.export_checkpoint, args.out, args.seq_len, args.batch)
        print(f"step {step} -> {args.out}")
        return 0
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(args.checkpoint)
    resuming = ckpt_path.exists()
    fmt = logging.Formatter("%(asctime)s %(message)s")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    for h in (logging.FileHandler(args.log, mode="a" if resuming else "w"), logging.StreamHandler()):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    log.info("args %s", json.dumps(vars(args)))
    log.info("python %s torch %s threads %d MKL_CBWR %s aten %s", sys.version.split()[0], torch.__version__,
             torch.get_num_threads(), os.environ.get("MKL_CBWR"), torch.backends.cpu.get_cpu_capability())

    t0 = time.time()
    corpus_dir = Path(args.corpus)
    manifest = build_corpus(corpus_dir) if not (corpus_dir / "manifest.json").exists() else \
        json.loads((corpus_dir / "manifest.json").read_text(encoding="utf-8"))
    log.info("corpus %s", json.dumps(manifest, sort_keys=True))
    train = np.fromfile(corpus_dir / "train.bin", dtype=np.uint16)
    if train.size != manifest["train_tokens"]:
        raise RuntimeError(f"{corpus_dir / 'train.bin'} holds {train.size} tokens, the manifest says "
                           f"{manifest['train_tokens']}: rebuild it (python -m mcmoe_vl.data.corpus {corpus_dir})")
    held = _docs_stream(load_jsonl(corpus_dir / "heldout.jsonl"))
    ood = _docs_stream(load_jsonl(corpus_dir / "ood.jsonl"))
    reserved = _docs_stream(load_jsonl(corpus_dir / "reserved.jsonl"))
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0  # add-one unigram, train split
    logp = np.log(counts / counts.sum())
    uni_ppl = math.exp(-logp[held].mean())
    log.info("train %d tokens, held-out %d, ood %d, reserved %d; unigram held-out ppl %.2f (%.1fs)",
             train.size, held.size, ood.size, reserved.size, uni_ppl, time.time() - t0)

    from transformers import MixtralForCausalLM

    cfg = model_config(args.seq_len)
    model = MixtralForCausalLM(cfg)
    n_par = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    log.info("params %d, experts %d (%.1f%%); schedule %d steps x %d tokens = %.1f tokens per parameter",
             n_par, n_exp, 100 * n_exp / n_par, args.steps, args.batch * args.seq_len,
             args.steps * args.batch * args.seq_len / n_par)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    g = torch.Generator().manual_seed(args.seed)
    start, elapsed0 = 0, 0.0
    if resuming:
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        start, elapsed0 = state["step"], state["elapsed"]
        log.info("resumed from %s at step %d (%.1f s trained before)", ckpt_path, start, elapsed0)
    model.train()
    t_train = time.time()
    t_ckpt = t_train
    step = start
    for step in range(start + 1, args.steps + 1):
        x = batch(train, args.batch, args.seq_len, g)
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        ce = F.cross_entropy(out.logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        aux, freqs = balance_loss(out.router_logits, cfg.num_experts_per_tok)
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step <= args.exact_steps:
            log.info("exact step %d loss %r ce %r", step, loss.item(), ce.item())
        if step % 100 == 0 or step == 1:
            ratio = (freqs.max(1).values / freqs.min(1).values.clamp_min(1e-9)).tolist()
            log.info("step %d ce %.4f aux %.4f lr %.2e max/min %s min-share %s %.1fs", step, ce.item(), aux.item(),
                     sched.get_last_lr()[0], [round(r, 1) for r in ratio],
                     [round(v, 4) for v in freqs.min(1).values.tolist()], elapsed0 + time.time() - t_train)
        out_of_time = (time.time() - t_train) / 60 > args.max_minutes
        last = step == args.steps or step == args.stop_step or out_of_time
        if step % args.eval_every == 0 or step == args.steps:
            h, o, r = (evaluate(model, d, args.seq_len, 32) for d in (held, ood, reserved))
            log.info("eval step %d tokens/param %.2f held-out ppl %.3f ood ppl %.3f reserved ppl %.3f (unigram %.2f)",
                     step, step * args.batch * args.seq_len / n_par, math.exp(h), math.exp(o), math.exp(r), uni_ppl)
        if step < args.steps and (last or (time.time() - t_ckpt) / 60 > args.checkpoint_minutes):
            _save_state(ckpt_path, model, opt, sched, g, step, elapsed0 + time.time() - t_train)
            t_ckpt = time.time()
            log.info("checkpoint at step %d -> %s", step, ckpt_path)
        if last:
            break
    train_s = elapsed0 + time.time() - t_train
    if step < args.steps:
        log.info("stopped at step %d of %d (%.1f s trained); run the same command again to resume", step,
                 args.steps, train_s)
        return 0
    log.info("trained %d steps in %.1f s", step, train_s)
    if ckpt_path.exists():
        ckpt_path.unlink()  # the finished model replaces the training state

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_dtype = getattr(torch, args.save_dtype)
    model.to(save_dtype)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    cfg_file = out_dir / "config.json"  # stored in save_dtype, loaded as float32 by default ("dtype": "auto")
    cfg_json = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg_json["dtype"] = "float32"
    cfg_file.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    byte_tokenizer(model_max_length=args.seq_len).save_pretrained(str(out_dir))
    meta = {"seed": args.seed, "steps": step, "train_seconds": round(train_s, 1), "stored_dtype": args.save_dtype,
            "corpus": manifest, "params": n_par, "expert_params": n_exp,
            "tokens_per_param": round(step * args.batch * args.seq_len / n_par, 2),
            "unigram_heldout_ppl": round(uni_ppl, 3), "args": vars(args)}
    (out_dir / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("saved to %s", out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
