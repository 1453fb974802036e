"""Run lm-eval's or lmms-eval's own command line with the ``mcmoe`` model registered.

    python -m mcmoe_vl.evaluation.harness lm-eval   --model mcmoe --model_args pretrained=DIR --tasks ... [...]
    python -m mcmoe_vl.evaluation.harness lmms-eval --model mcmoe --model_args pretrained=DIR --tasks ... [...]

Everything after the harness name is the harness's own arguments, unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

HARNESSES = ("lm-eval", "lmms-eval")


def run_harness(harness: str, argv: Sequence[str]) -> int:
    """Register ``mcmoe`` with ``harness`` and run its command line on ``argv``; returns its exit status."""
    if harness not in HARNESSES:
        raise ValueError(f"unknown harness {harness!r}; valid: {', '.join(HARNESSES)}")
    saved = sys.argv
    sys.argv = [harness, *argv]
    try:
        if harness == "lm-eval":
            import mcmoe_vl.evaluation.harness_lm_eval  # noqa: F401  (registers the model)
            from lm_eval.__main__ import cli_evaluate

            cli_evaluate()
        else:
            from mcmoe_vl.evaluation.harness_lmms_eval import register

            register()
            from lmms_eval.__main__ import cli_evaluate as lmms_cli

            lmms_cli()
    except SystemExit as exc:  # the harnesses exit on --help and on argument errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in HARNESSES:
        print(__doc__, file=sys.stderr)
        return 2
    return run_harness(args[0], args[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
