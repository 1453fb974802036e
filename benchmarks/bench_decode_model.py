"""Decode tokens/s of a whole real-size MoE language model: 16-bit against packed 2.5 bits, random weights.

    .venv/bin/python -m mcmoe_vl.quant.native build          # once
    .venv/bin/python benchmarks/bench_decode_model.py [--layers 12] [--threads 1] [--clock cpu] [--new 32]
        [--repeat 5] [--lm-head-bits 4]

The model is DeepSeek-VL2-tiny's language model geometry (values below; multi-head attention, greedy softmax
routing: the port's ``DeepseekVL2MHAV2ForCausalLM``) with random bf16 weights. Decode speed is measured with
``generate`` (greedy, KV cache, a 16-token prompt, exactly ``--new`` new tokens): decode time = time(prompt + new
tokens) - time(prompt + 1 token), tokens/s = (new - 1) / decode time. Both models are held in memory and their
runs alternate (16-bit, packed, 16-bit, ...), so a change in the machine's load hits both sides of a pair; the
speed-up is the median of the per-pair ratios, given with its range over the ``--repeat`` pairs.

Then the model is compressed in place the way ``quantize_model`` lays it out, with random codes: routed experts as
:class:`QuantExperts` at a PMQ-like plan averaging 2.5 bits (3,2,1,3,3,2,3,3 repeated), every other linear of the
decoder layers (attention, shared experts, the dense first MLP) at 4 bits, the router, embeddings and ``lm_head`` in
bf16 (``--lm-head-bits 4``: the ``lm_head`` packed at 4 bits too); every packed linear runs ``Kernel.SIMD`` (decode
steps: one fused native call per MoE layer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from mcmoe_vl.quant import kernels, native
from mcmoe_vl.quant.qlinear import Kernel, QuantExpert, QuantExperts, QuantLinear
from model_adapters import get_adapter
from model_adapters.deepseek_vl2.configuration import LanguageConfig, text_config_from_official
from model_adapters.deepseek_vl2.modeling import build_language_model

from bench_kernels import PMQ_25, cpu_model, random_packed  # noqa: E402 - run from benchmarks/ or with its path

# DeepSeek-VL2-tiny's language_config
TINY_LM = dict(vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
               num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, n_shared_experts=2,
               n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, routed_scaling_factor=1.0,
               topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax", norm_topk_prob=False,
               use_mla=False, kv_lora_rank=None, q_lora_rank=None, max_position_embeddings=4096)


def build(layers: int) -> nn.Module:
    cfg = text_config_from_official(LanguageConfig(**{**TINY_LM, "num_hidden_layers": layers}))
    with torch.device("meta"):
        model = build_language_model(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
        for name, b in model.named_buffers():
            if b.is_floating_point() and "inv_freq" in name:
                dim = b.numel() * 2
                b.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    return model.eval()


def compress(model: nn.Module, lm_head_bits: int = 16) -> None:
    """Replace the experts and the decoder layers' linears by random packed ones (see the module docstring)."""
    g = torch.Generator().manual_seed(1)
    mk = lambda bits, r, c: QuantLinear(random_packed(bits, r, c, g), dtype=torch.bfloat16,  # noqa: E731
                                        kernel=Kernel.SIMD)
    adapter = get_adapter(model)
    for layer in adapter.moe_layers(model):
        st = layer.storage
        w = st.weights(0)
        i_dim, h_dim = w.gate.shape
        experts = [QuantExpert(mk(PMQ_25[e % 8], h_dim, i_dim), st.act_fn, gate_up=mk(PMQ_25[e % 8], 2 * i_dim, h_dim))
                   for e in range(layer.num_experts)]
        setattr(layer.block, adapter.experts_attr, QuantExperts(experts, st.act_fn))
    n_router = TINY_LM["n_routed_experts"]
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and ".layers." in f"{name}." and child.out_features != n_router:
                setattr(mod, child_name, mk(4, child.out_features, child.in_features))
    if lm_head_bits != 16:
        head = model.lm_head
        model.lm_head = mk(lm_head_bits, head.out_features, head.in_features)


def decode_rates(models: list[nn.Module], new: int, repeat: int, clock) -> list[list[float]]:
    """Decode tokens/s of each model, ``repeat`` rounds, the models alternating within a round."""
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(model: nn.Module, n: int) -> float:
        t = clock()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == 16 + n
        return clock() - t

    for model in models:
        run(model, new)  # warm-up: a whole run (a 2-token one left the first measured packed run 2x slow)
    rates: list[list[float]] = [[] for _ in models]
    for _ in range(repeat):
        for model, r in zip(models, rates):
            r.append((new - 1) / (run(model, new) - run(model, 1)))
    return rates


def resident(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lm-head-bits", type=int, default=16, choices=[2, 3, 4, 16],
                    help="16: lm_head stays bf16 (default); else packed at this width too")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("native kernels are not built: run `python -m mcmoe_vl.quant.native build` first")
    print(f"CPU: {cpu_model()}, SIMD {native.cpu_isa().name}; torch {torch.__version__}, {args.threads} threads, "
          f"{args.clock} clock; load average before {os.getloadavg()}")
    print(f"DeepSeek-VL2-tiny language model, {args.layers} decoder layers: {TINY_LM}")
    model = build(args.layers)
    b16 = resident(model)
    packed = build(args.layers)  # the same random weights (same seed), then compressed
    compress(packed, args.lm_head_bits)
    bq = resident(packed)
    all16, allq = decode_rates([model, packed], args.new, args.repeat, clock)
    ratios = sorted(q / r for q, r in zip(allq, all16))
    head = "" if args.lm_head_bits == 16 else f", lm_head {args.lm_head_bits}-bit"
    print("\n| model | resident GB | decode tokens/s (median) | runs | vs 16-bit: median of pair ratios [min-max] |"
          "\n|---|---|---|---|---|")
    print(f"| bf16 | {b16 / 1e9:.2f} | {statistics.median(all16):.2f} | {', '.join(f'{r:.2f}' for r in all16)} | "
          "1.00x |")
    print(f"| packed 2.5-bit experts, 4-bit other linears{head} (SIMD, fused MoE) | {bq / 1e9:.2f} | "
          f"{statistics.median(allq):.2f} | {', '.join(f'{r:.2f}' for r in allq)} | "
          f"{statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}], {len(ratios)} pairs |")
    print(f"\nload average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
