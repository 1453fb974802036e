"""mcmoe-vl export: a compressed checkpoint directory -> a format other engines read.

    mcmoe-vl export runs/q --format compressed-tensors --output runs/q-ct
    mcmoe-vl export runs/q --format gptq --output runs/q-gptq

compressed-tensors (pack-quantized, per-group int codes of 1-8 bits) is read by vLLM and by transformers with
the compressed-tensors package; gptq (2, 3, 4 or 8 bits; other widths as GPTQModel "dynamic" overrides) by
vLLM's gptq kernels and by GPTQModel. 1-bit experts are written as 2-bit codes {0, 2} with zero 1 (exactly the same
weights), and the command says how many. docs/interop.md names which engine serves which export. Calls
mcmoe_vl.export.compressed_tensors.export_compressed_tensors or mcmoe_vl.export.gptq.export_gptq.
"""

from __future__ import annotations

import argparse

from mcmoe_vl.cli.common import help_style

FORMATS = ("compressed-tensors", "gptq")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a compressed checkpoint for other engines", **help_style(__doc__))
    p.add_argument("checkpoint", help="compressed checkpoint directory (from mcmoe-vl quantize or a suite)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--output", "-o", required=True, help="directory to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "gptq":
        from mcmoe_vl.export.gptq import export_gptq as export
    else:
        from mcmoe_vl.export.compressed_tensors import export_compressed_tensors as export
    summary = export(args.checkpoint, args.output)
    widths = ", ".join(f"{n} at {w}" for w, n in summary["modules"].items())
    print(f"wrote {args.output} ({args.format}): {widths}")
    if summary["one_bit_as_two"]:
        print(f"{len(summary['one_bit_as_two'])} 1-bit linears written as 2-bit codes {{0, 2}} with zero 1 "
              "(the same weights; the format has no symmetric 1-bit code)")
    return 0
