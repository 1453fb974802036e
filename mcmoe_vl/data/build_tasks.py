"""Rebuild the shipped offline task data: ``python -m mcmoe_vl.data.build_tasks [--only text|vqa]``.

Writes ``tasks/lm_eval/data`` (:func:`.lm_tasks.build_text_task_files`; :func:`.lm_tasks.build_corpus_task_files`
for the source-code corpus, with its training split's unigram counts)
and ``tasks/lmms_eval/data`` (:func:`.vqa_tasks.build_vqa_task_files`). The shipped files were built on the Python
recorded in each ``manifest.json``; another Python release has a slightly different standard library, hence
different files (and numbers that are not comparable with the recorded ones).
"""

from __future__ import annotations

import argparse
import logging

from .lm_tasks import build_corpus_task_files, build_text_task_files
from .tasks import LM_EVAL_TASKS_DIR, LMMS_EVAL_TASKS_DIR
from .vqa_tasks import build_vqa_task_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=["text", "source", "vqa"], default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.only in (None, "text"):
        build_text_task_files(LM_EVAL_TASKS_DIR / "data")
    if args.only in (None, "source"):
        build_corpus_task_files(LM_EVAL_TASKS_DIR / "data")
    if args.only in (None, "vqa"):
        build_vqa_task_files(LMMS_EVAL_TASKS_DIR / "data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
