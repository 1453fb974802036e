"""``mcmoe-vl prune``: fit ODP thresholds or train OTP mask predictors; writes the pruning artifact.

    mcmoe-vl prune MODEL_DIR --data calib.txt --method odp --output runs/q/pruning.json \\
        [--prune-rate 0.15 | --quantile 0.5 | --mu 0.3] [--protect 0.02] [--layers 1 2 3]
    mcmoe-vl prune MODEL_DIR --data calib.txt --method otp --output runs/q/pruning.json --prune-rate 0.2

Written as pruning.json into a compressed directory (runs/q, from mcmoe-vl quantize), the settings are applied
whenever that directory is loaded (from_pretrained, mcmoe-vl eval); the output may not lie inside MODEL_DIR itself.
In Python, ``mcmoe_vl.pruning.apply_pruning(iface, load_pruning(path))`` turns an artifact on. Calls
:func:`mcmoe_vl.pruning.workflow.prune_files`.
"""

from __future__ import annotations

import argparse

from mcmoe_vl.cli.common import help_style, seq_len_for


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="fit dynamic expert pruning (ODP thresholds or OTP predictors)",
                       **help_style(__doc__))
    p.add_argument("model", help="model directory (config.json + safetensors)")
    p.add_argument("--data", required=True,
                   help="text file (UTF-8), token-ids file (.json / .safetensors), embedded:<name>, or "
                        "hf:<dataset>[:<config>[:<split>]]")
    p.add_argument("--output", "-o", required=True, help="artifact JSON to write (OTP adds a .safetensors beside it)")
    p.add_argument("--method", required=True, choices=["odp", "otp"])
    p.add_argument("--prune-rate", type=float, default=None,
                   help="fraction of top-k (token, expert) pairs to remove on the calibration data")
    p.add_argument("--quantile", type=float, default=0.5, help="ODP: quantile of w_e/w_top1 for mu (0.5 = median)")
    p.add_argument("--mu", type=float, default=None, help="ODP: one fixed threshold for every layer")
    p.add_argument("--protect", type=float, default=0.02, help="ODP: fraction of tokens protected in prefill")
    p.add_argument("--protect-scope", default="sequence", choices=["sequence", "batch"])
    p.add_argument("--layers", type=int, nargs="*", default=None, help="decoder layers to prune (default: all MoE)")
    p.add_argument("--otp-steps", type=int, default=300)
    p.add_argument("--otp-width", type=int, default=32, help="OTP predictor hidden width (0: linear)")
    p.add_argument("--otp-lambda", type=float, default=0.05, help="OTP activation penalty without --prune-rate")
    p.add_argument("--otp-max-tokens", type=int, default=8192, help="OTP calibration tokens per layer")
    p.add_argument("--num-sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mcmoe_vl.pruning.artifact import PruningMethod
    from mcmoe_vl.pruning.odp import ODPConfig
    from mcmoe_vl.pruning.otp import OTPConfig
    from mcmoe_vl.pruning.workflow import PruneRun, prune_files

    layers = tuple(args.layers) if args.layers else None
    art = prune_files(PruneRun(
        model=args.model, data=args.data, output=args.output, method=PruningMethod(args.method),
        odp=ODPConfig(mu=args.mu, prune_rate=args.prune_rate, quantile=args.quantile, layers=layers,
                      protect_ratio=args.protect, protect_scope=args.protect_scope),
        otp=OTPConfig(prune_rate=args.prune_rate, steps=args.otp_steps, width=args.otp_width, lam=args.otp_lambda,
                      max_tokens=args.otp_max_tokens, seed=args.seed, layers=layers),
        num_sequences=args.num_sequences, seq_len=seq_len_for(args.model, args.seq_len, args.data),
        batch_size=args.batch_size, seed=args.seed,
        dtype=args.dtype, device=args.device, progress=not args.no_progress,
    ))
    print(f"wrote {args.output}: {art.method.value} on decoder layers {art.pruned_layers}")
    return 0
