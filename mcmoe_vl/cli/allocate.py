"""``mcmoe-vl allocate``: statistics file -> bit plan (PMQ's integer program or a baseline).

    mcmoe-vl allocate runs/stats.json --output runs/plan.json --target-bits 2.54 [--method pmq] [--scope global]
    mcmoe-vl allocate runs/stats.json -o plan.json --config alloc.yaml --target-bits 2.0   # flag beats file
    mcmoe-vl allocate runs/stats.json -o plan.json --method pmq+ --target-bits 2.0 --model MODEL_DIR \
        --data calib.txt [--num-sequences 128 --seq-len 2048 --data-seed 0] [--select-sequences 32] \
        [--candidates pmq pmq-global uniform] [--max-candidates 3] [--preview gptq|rtn] [--no-refit-1bit]

``pmq+`` measures candidate plans on the model: ``--data`` (with ``--num-sequences``, ``--seq-len``,
``--data-seed``) must be the calibration run's data; the selection split (``--select-data``, default other
windows of the same source) is held apart from it. Never give evaluation data.

Precedence: flags, then ``--config`` (YAML or JSON with :class:`AllocationConfig` fields), then defaults. Calls
:func:`mcmoe_vl.allocation.workflow.allocate_files`.
"""

from __future__ import annotations

import argparse

from mcmoe_vl.cli.common import help_style, seq_len_for
import json
from pathlib import Path

# flag dest -> AllocationConfig field (all flags default to None so that only given ones override the file)
_FIELDS = ("method", "target_bits", "budget", "bits", "scope", "alpha", "beta", "gamma", "require_widths",
           "solver", "time_limit_s", "seed", "block_widths", "group_size", "other_bits", "shared_experts_bits",
           "per_layer_uniform")


def register(sub: argparse._SubParsersAction) -> None:
    from mcmoe_vl.allocation.allocators import ALLOCATORS

    p = sub.add_parser("allocate", help="allocate expert bit widths from calibration statistics",
                       **help_style(__doc__))
    p.add_argument("stats", help="calibration statistics JSON (from mcmoe-vl calibrate)")
    p.add_argument("--output", "-o", required=True, help="bit plan JSON to write")
    p.add_argument("--config", default=None, help="YAML / JSON file with allocation settings")
    p.add_argument("--method", default=None, help=f"allocator: {', '.join(ALLOCATORS.names())} (default pmq)")
    p.add_argument("--target-bits", type=float, default=None, help="average bits per expert weight (default 2.0)")
    p.add_argument("--budget", default=None, choices=["nominal", "effective"])
    p.add_argument("--bits", type=int, nargs="+", default=None, help="allowed widths (default 1 2 3)")
    p.add_argument("--scope", default=None, choices=["layer", "global"])
    p.add_argument("--alpha", type=float, default=None, help="exponent of phi (default 1)")
    p.add_argument("--beta", type=float, default=None, help="exponent of w (default 1)")
    p.add_argument("--gamma", type=float, default=None, help="exponent of eps (default 2)")
    p.add_argument("--require-widths", type=int, nargs="*", default=None,
                   help="widths needing >= 1 expert per layer (default: 2 and 3; none to disable)")
    p.add_argument("--solver", default=None, choices=["cbc", "scip", "dp"])
    p.add_argument("--time-limit-s", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the random baseline")
    p.add_argument("--block-widths", type=int, nargs=2, default=None, help="block baseline: low high")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--other-bits", type=int, default=None, help="width of other linear layers (default 4)")
    p.add_argument("--shared-experts-bits", type=int, default=None, help="width of shared experts (default 4)")
    p.add_argument("--per-layer-uniform", action="store_true", default=None,
                   help="one width for all experts of a layer (what serving engines need; model-wide budget)")
    p.add_argument("--heatmap", default=None, help="also write the bit-allocation heatmap (PNG)")
    g = p.add_argument_group("pmq+ (candidate plans chosen by measured calibration loss)")
    g.add_argument("--model", default=None, help="model directory")
    g.add_argument("--data", default=None, help="the calibration run's data (plan building and GPTQ preview)")
    g.add_argument("--num-sequences", type=int, default=128)
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--data-seed", type=int, default=0, help="the calibration run's --seed")
    g.add_argument("--select-data", default=None, help="selection split source (default: --data, other windows)")
    g.add_argument("--select-sequences", type=int, default=32)
    g.add_argument("--select-seed", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--candidates", nargs="*", default=None, help="candidate plans (default: pmq pmq-global "
                   "uniform eps-global pmq-global-free; unreachable ones skipped)")
    g.add_argument("--max-candidates", type=int, default=None, help="evaluate at most this many")
    g.add_argument("--preview", default="gptq", choices=["gptq", "rtn"])
    g.add_argument("--no-refit-1bit", action="store_true", help="the paper's 1-bit scales (no refit)")
    g.add_argument("--min-tokens", type=int, default=16, help="fewer tokens: round-to-nearest fallback")
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    """AllocationConfig from flags over the config file over defaults."""
    from mcmoe_vl.allocation.config import AllocationConfig

    values: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"allocation config not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of allocation settings")
    for name in _FIELDS:
        v = getattr(args, name)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    return AllocationConfig.model_validate(values)


def run(args: argparse.Namespace) -> int:
    from mcmoe_vl.allocation.workflow import allocate_files

    config = resolve_config(args)
    if config.method == "pmq+":
        plan = _run_plus(args, config)
    else:
        plan = allocate_files(args.stats, args.output, config, heatmap=args.heatmap)
    print(f"wrote {args.output}: {plan.allocator}, target {config.target_bits:g} {config.budget.value} bits, "
          f"achieved {plan.achieved['nominal']:.4f} nominal / {plan.achieved['effective']:.4f} effective")
    return 0


def _run_plus(args: argparse.Namespace, config):
    from mcmoe_vl.allocation.plus import PlusConfig
    from mcmoe_vl.allocation.workflow import PlusData, allocate_plus_files

    if not args.model or not args.data:
        raise ValueError("--method pmq+ measures candidate plans on the model: give --model and --data (the "
                         "calibration run's data)")
    plus = PlusConfig(candidates=None if args.candidates is None else tuple(args.candidates),
                      max_candidates=args.max_candidates, preview=args.preview, refit_1bit=not args.no_refit_1bit,
                      min_tokens=args.min_tokens)
    # the same clamp as calibrate's, so that the same flags give the same windows
    seq_len = seq_len_for(args.model, args.seq_len, args.data)
    data = PlusData(model=args.model, data=args.data, num_sequences=args.num_sequences, seq_len=seq_len,
                    seed=args.data_seed, select_data=args.select_data, select_sequences=args.select_sequences,
                    select_seed=args.select_seed, batch_size=args.batch_size, dtype=args.dtype)
    plan = allocate_plus_files(args.stats, args.output, config, data, plus, heatmap=args.heatmap)
    losses = ", ".join(f"{c['name']} {c['loss']:.4f}" for c in plan.selection["candidates"])
    print(f"pmq+: chose {plan.selection['chosen']} (calibration loss: {losses})")
    return plan
