"""``mcmoe-vl report``: a comparative markdown report from saved results files.

    mcmoe-vl report runs/default/results -o reports/default
    mcmoe-vl report old/results/*.json new/results/*.json -o reports/compare --baseline 16-bit

Arguments are results files or directories (every ``results/**/*.json`` below them). The report is built from those
files only, in a fixed order, so the same files give the same bytes; rows of different run dates sit side by side.
Calls :func:`mcmoe_vl.report.build.build_report`.
"""

from __future__ import annotations

import argparse
import shlex


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="build the markdown report from results files",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results files or directories")
    p.add_argument("--output", "-o", default="reports/report", help="report directory (default: reports/report)")
    p.add_argument("--baseline", default=None, help="recipe every row is compared with (default: 16-bit rows)")
    p.add_argument("--compare-to", default=None,
                   help="recipe every compressed row is also compared with by the paired test (default: the same "
                        "quantization without pruning, else uniform at the same bits)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval and significance level (default 0.95)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples per interval (default 2000)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mcmoe_vl.report.build import build_report

    command = "mcmoe-vl report " + " ".join(shlex.quote(r) for r in args.results) + f" -o {shlex.quote(args.output)}"
    if not 0.5 < args.confidence < 1.0:
        raise SystemExit(f"--confidence must be between 0.5 and 1 (e.g. 0.95), got {args.confidence}")
    if args.bootstrap < 100:
        raise SystemExit(f"--bootstrap must be at least 100 resamples, got {args.bootstrap}")
    for flag, value in (("--baseline", args.baseline), ("--compare-to", args.compare_to)):
        if value:
            command += f" {flag} {shlex.quote(value)}"
    if (args.confidence, args.bootstrap) != (0.95, 2000):
        command += f" --confidence {args.confidence:g} --bootstrap {args.bootstrap}"
    path = build_report(args.results, args.output, title=args.title, baseline=args.baseline, command=command,
                        compare_to=args.compare_to, confidence=args.confidence, bootstrap=args.bootstrap)
    print(f"wrote {path}")
    return 0
