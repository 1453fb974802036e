"""The ``mcmoe-vl`` command line: a thin layer, one subcommand per library function.

Each subcommand lives in ``mcmoe_vl/cli/<name>.py`` and exposes ``register(subparsers)``, which adds its parser and
sets ``func`` (called with the parsed namespace, returns an exit code). Library code never reads ``sys.argv``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Order is the order shown in --help.
PASSTHROUGH: tuple[str, ...] = ("eval",)  # subcommands that take arguments after --
SUBCOMMANDS: tuple[str, ...] = ("run", "report", "calibrate", "allocate", "quantize", "prune", "eval", "export",
                                "adapters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcmoe-vl",
        description="Compress Mixture-of-Experts models (PMQ quantization, ODP/OTP pruning) and benchmark them.",
    )
    from mcmoe_vl import __version__

    parser.add_argument("--version", action="version", version=f"mcmoe-vl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"mcmoe_vl.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:  # the rest goes to the tool a subcommand wraps (mcmoe-vl eval: the harness)
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    if passthrough and args.command not in PASSTHROUGH:
        parser.error(f"arguments after -- are only for {', '.join(PASSTHROUGH)}")
    args.passthrough = passthrough
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + 1, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Input errors: one clear line, no traceback (use -vv for one).
        if args.verbose >= 2:
            raise
        print(f"mcmoe-vl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
