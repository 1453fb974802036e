"""``mcmoe-vl run``: run (or resume) a benchmark suite and write its report.

    mcmoe-vl run                          # the embedded default suite (suites/default.toml)
    mcmoe-vl run suites/paper_mixtral.toml --run-dir /data/runs/mixtral
    mcmoe-vl run SUITE --recipe "PMQ 2.0" --model tiny-mixtral    # a subset
    mcmoe-vl run SUITE --check            # validate the suite (checkpoints, tasks, data) and stop

Stages (calibrate, allocate, quantize, prune, evaluate) are cached by their inputs under the run directory
(default ``runs/<suite>``); a re-run does only what changed. The report goes to ``reports/<suite>/report.md``.
Calls :func:`mcmoe_vl.suite.runner.run_suite`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DEFAULT_SUITE = "suites/default.toml"


def default_suite_path() -> Path:
    """``suites/default.toml`` of the working directory, else the one shipped beside the package."""
    here = Path(DEFAULT_SUITE)
    if here.is_file():
        return here
    return Path(__file__).resolve().parents[2] / DEFAULT_SUITE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a benchmark suite (default: the embedded default suite) and report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="?", default=None, help=f"suite file, TOML or YAML (default: {DEFAULT_SUITE})")
    p.add_argument("--run-dir", default=None, help="where stage artifacts are cached (default: runs/<suite>)")
    p.add_argument("--report-dir", default=None, help="where the report goes (default: reports/<suite>)")
    p.add_argument("--model", action="append", default=None, help="only this model (repeatable)")
    p.add_argument("--recipe", action="append", default=None, help="only this recipe (repeatable)")
    p.add_argument("--check", action="store_true", help="validate the suite and stop")
    p.add_argument("--overwrite-report", action="store_true",
                   help="write the report into the report directory even when a recipe failed or was not run "
                        "(default: an existing report there is kept, and this run's goes to <run dir>/report)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mcmoe_vl.suite.load import load_suite, preflight
    from mcmoe_vl.suite.runner import run_suite

    path = Path(args.suite) if args.suite else default_suite_path()
    loaded = load_suite(path)
    if args.check:
        preflight(loaded)
        st = loaded.suite
        n_eval = sum(len(st.seeds_for(r)) for m in st.models for r in st.recipes_for(m))
        print(f"{path}: OK ({len(st.models)} models, {len(st.recipes)} recipes, {len(st.tasks)} tasks, "
              f"seeds {st.all_seeds}; {n_eval} (model, recipe, seed) evaluations)")
        return 0
    command = "mcmoe-vl run" + (f" {shlex.quote(args.suite)}" if args.suite else "")
    for flag, values in (("--run-dir", [args.run_dir]), ("--report-dir", [args.report_dir]),
                         ("--model", args.model or []), ("--recipe", args.recipe or [])):
        command += "".join(f" {flag} {shlex.quote(v)}" for v in values if v)
    summary = run_suite(loaded, run_dir=args.run_dir, report_dir=args.report_dir, progress=not args.no_progress,
                        command=command, models=args.model, recipes=args.recipe,
                        overwrite_report=args.overwrite_report)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    done = sum(summary.computed.values())
    print(f"{len(summary.results)} results in {summary.run_dir / 'results'} ({done} stages run, "
          f"{sum(summary.reused.values())} reused)" + (f"; report: {summary.report}" if summary.report else ""))
    if summary.kept_report is not None:
        print(f"the run is incomplete ({len(summary.failed)} failed, {len(summary.not_run)} not run), so "
              f"{summary.kept_report} was kept; this run's report is {summary.report} "
              "(--overwrite-report replaces it)", file=sys.stderr)
    return 1 if summary.failed else 0
