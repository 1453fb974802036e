"""mcmoe-vl eval: evaluate a model directory (compressed or not) with lm-eval or lmms-eval.

    mcmoe-vl eval runs/q --tasks mcmoe_docstring_cloze --limit 20
    mcmoe-vl eval runs/vl2-q --tasks mcmoe_vqa_colour --limit 8 --batch-size 8
    mcmoe-vl eval runs/q --tasks mcmoe_docstring_cloze -- --output_path runs/q-eval --log_samples

A thin wrapper: the harness's own command line runs with model mcmoe, model_args pretrained=DIR, the project's
offline tasks on the include path, and every argument after -- passed unchanged. The harness is lmms-eval for
vision-language directories (the adapter of their model_type says so) and lm-eval otherwise. Calls
mcmoe_vl.evaluation.harness.run_harness.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mcmoe_vl.cli.common import help_style


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a (compressed) model directory with lm-eval or lmms-eval",
                       **help_style(__doc__))
    p.add_argument("model", help="model directory (a compressed checkpoint or an original model)")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--harness", choices=["auto", "lm-eval", "lmms-eval"], default="auto",
                   help="auto: lmms-eval for vision-language models, lm-eval otherwise")
    p.add_argument("--limit", type=float, default=None, help="examples per task (all when not given)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runtime", choices=["packed", "fake"], default="packed",
                   help="fake caches dequantised weights: faster, 16-bit memory, the same scores")
    p.add_argument("--no-pruning", action="store_true", help="ignore the directory's pruning settings")
    p.add_argument("--include-path", default=None, help="task directory (default: the project's offline tasks)")
    p.set_defaults(func=run)


def harness_for(model_dir: str | Path) -> str:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    from mcmoe_vl.registry import RegistryError
    from model_adapters import ADAPTERS

    model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    try:
        vision_language = ADAPTERS.get(str(model_type))().is_vision_language
    except RegistryError:
        vision_language = False  # no adapter: a text model as far as the harness choice goes
    return "lmms-eval" if vision_language else "lm-eval"


def harness_argv(args: argparse.Namespace, harness: str) -> list[str]:
    from mcmoe_vl.api import default_task_dir

    tasks = args.include_path or str(default_task_dir().parent / ("lmms_eval" if harness == "lmms-eval" else "lm_eval"))
    model_args = f"pretrained={args.model},runtime={args.runtime},apply_pruning={not args.no_pruning}"
    argv = ["--model", "mcmoe", "--model_args", model_args, "--tasks", args.tasks, "--include_path", tasks,
            "--batch_size", str(args.batch_size)]
    if args.limit is not None:
        argv += ["--limit", f"{args.limit:g}"]
    return argv + list(getattr(args, "passthrough", []))


def run(args: argparse.Namespace) -> int:
    from mcmoe_vl.evaluation.harness import run_harness

    harness = harness_for(args.model) if args.harness == "auto" else args.harness
    return run_harness(harness, harness_argv(args, harness))
