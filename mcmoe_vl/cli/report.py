"""``mcmoe-vl report``: a comparative markdown report from saved results files.

    mcmoe-vl report runs/default/results -o reports/default
    mcmoe-vl report old/results/*.json new/results/*.json -o reports/compare --baseline 16-bit

Arguments are results files or directories (every ``results/**/*.json`` below them). The report is built from those
files only, in a fixed order, so the same files give the same bytes; rows of different run dates sit side by side.
Calls :func:`mcmoe_vl.report.build.build_report`.
"""

from __future__ import annotations

import argparse

from mcmoe_vl.cli.common import help_style
import shlex


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="build the markdown report from results files",
                       **help_style(__doc__))
    p.add_argument("results", nargs="+", help="results files or directories")
    p.add_argument("--output", "-o", default="reports/report", help="report directory (default: reports/report)")
    p.add_argument("--baseline", default=None, help="recipe every row is compared with (default: 16-bit rows)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mcmoe_vl.report.build import build_report

    command = "mcmoe-vl report " + " ".join(shlex.quote(r) for r in args.results) + f" -o {shlex.quote(args.output)}"
    if args.baseline:
        command += f" --baseline {shlex.quote(args.baseline)}"
    path = build_report(args.results, args.output, title=args.title, baseline=args.baseline, command=command)
    print(f"wrote {path}")
    return 0
