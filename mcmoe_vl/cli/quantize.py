"""``mcmoe-vl quantize``: model directory + bit plan + calibration data -> compressed checkpoint directory.

    mcmoe-vl quantize MODEL_DIR --plan plan.json --data calib.txt --output runs/q [--act-order]

The plan is a bit plan JSON: the allocator's (``mcmoe-vl allocate``) or a hand-written one
(:mod:`mcmoe_vl.quant.plan`).
Writes a Hugging Face model directory: config.json (with a quantization_config), the tokenizer and generation
files of MODEL_DIR, model.safetensors (packed weights) and quant_manifest.json (plan, bits per tensor, accounting).
After ``import mcmoe_vl``, transformers' ``AutoModelForCausalLM.from_pretrained(OUTPUT)`` loads it. Calls
:func:`mcmoe_vl.quant.workflow.quantize_files`.
"""

from __future__ import annotations

import argparse

from mcmoe_vl.cli.common import help_style, seq_len_for


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model to a bit plan (GPTQ, packed checkpoint)",
                       **help_style(__doc__))
    p.add_argument("model", help="model directory (config.json + safetensors)")
    p.add_argument("--plan", required=True, help="bit plan JSON (hand-written or from `mcmoe-vl allocate`)")
    p.add_argument("--data", required=True,
                   help="text file (UTF-8), token-ids file (.json / .safetensors), embedded:train|heldout|ood, or "
                        "hf:<dataset>[:<config>[:<split>]]")
    p.add_argument("--output", "-o", required=True, help="checkpoint directory to write")
    p.add_argument("--num-sequences", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="with --act-order: groups in natural order")
    p.add_argument("--range-search", action="store_true", help="min-max range search (101 factors, norm 2.4)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--min-tokens", type=int, default=16,
                   help="experts with fewer calibration tokens fall back to round-to-nearest")
    p.add_argument("--hessian-dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mcmoe_vl.quant.model import QuantizeConfig
    from mcmoe_vl.quant.workflow import QuantizeRun, quantize_files

    acc = quantize_files(QuantizeRun(
        model=args.model, plan=args.plan, data=args.data, output=args.output, num_sequences=args.num_sequences,
        seq_len=seq_len_for(args.model, args.seq_len, args.data),
        batch_size=args.batch_size, seed=args.seed, dtype=args.dtype, device=args.device,
        quantize=QuantizeConfig(act_order=args.act_order, static_groups=args.static_groups,
                                range_search=args.range_search, damp=args.damp, min_tokens=args.min_tokens,
                                hessian_dtype=args.hessian_dtype, progress=not args.no_progress),
    ))
    s = acc.summary()
    print(f"wrote {args.output}: nominal {s['nominal_bits']:.3f} bits, effective {s['effective_bits']:.3f} bits "
          f"(experts {s['effective_bits_experts']:.3f}), {s['bytes_on_disk']} bytes on disk, "
          f"{s['resident_bytes']} resident bytes")
    return 0
