"""``mcmoe-vl calibrate``: model directory + calibration data -> statistics file (phi, w, eps, Hessian traces).

    mcmoe-vl calibrate MODEL_DIR --data calib.txt --output runs/stats.json [--eps-bits 1 2 3] [--plot sig.png]

Resumes an interrupted run from ``--output`` unless ``--no-resume``. Calls
:func:`mcmoe_vl.calibration.workflow.calibrate_files`.
"""

from __future__ import annotations

import argparse

from mcmoe_vl.cli.common import help_style, seq_len_for


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure expert significance and the eps table on calibration data",
                       **help_style(__doc__))
    p.add_argument("model", help="model directory (config.json + safetensors)")
    p.add_argument("--data", required=True,
                   help="text file (UTF-8), token-ids file (.json / .safetensors), embedded:train / embedded:heldout "
                        "/ embedded:ood (the embedded model's source-code corpus), or hf:<dataset>[:<config>[:<split>]]")
    p.add_argument("--output", "-o", required=True, help="statistics JSON to write (and resume from)")
    p.add_argument("--num-sequences", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence for text data")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the random calibration windows")
    p.add_argument("--eps-bits", type=int, nargs="*", default=[1, 2, 3],
                   help="widths of the eps table (none: skip eps and HAWQ)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size for eps")
    p.add_argument("--eps-quantizer", default="rtn", choices=["rtn", "gptq"],
                   help="eps measured with round-to-nearest (the paper) or GPTQ on each expert's Hessian")
    p.add_argument("--refit-1bit", action="store_true", help="with --eps-quantizer gptq: the 1-bit scale refit")
    p.add_argument("--min-tokens", type=int, default=16, help="experts with fewer tokens are listed as starved")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-resume", action="store_true", help="start over even if --output exists")
    p.add_argument("--plot", default=None, help="also write the significance heatmaps (PNG)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mcmoe_vl.calibration.calibrate import CalibrationConfig
    from mcmoe_vl.calibration.workflow import CalibrationRun, calibrate_files

    stats = calibrate_files(CalibrationRun(
        model=args.model, data=args.data, output=args.output, num_sequences=args.num_sequences,
        seq_len=seq_len_for(args.model, args.seq_len, args.data),
        batch_size=args.batch_size, seed=args.seed, dtype=args.dtype, device=args.device,
        resume=not args.no_resume, significance_plot=args.plot, progress=not args.no_progress,
        calibration=CalibrationConfig(eps_bits=tuple(args.eps_bits), group_size=args.group_size,
                                      min_tokens=args.min_tokens, quantizer=args.eps_quantizer,
                                      refit_1bit=args.refit_1bit),
    ))
    starved = {la.index: la.starved for la in stats.layers if la.starved}
    print(f"wrote {args.output}: {len(stats.layers)} MoE layers, {stats.num_tokens} tokens"
          + (f"; starved experts (layer: experts): {starved}" if starved else ""))
    return 0
