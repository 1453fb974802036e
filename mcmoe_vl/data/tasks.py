"""Where the offline task suites live, and lm-eval task managers that find them.

``tasks/lm_eval/`` holds lm-eval 0.4 task YAMLs (group ``mcmoe_text_offline``) whose data loaders read files next to
them, so the tasks work wherever the repository is cloned; ``tasks/lmms_eval/`` holds the lmms-eval tasks (group
``mcmoe_vqa_offline``). ``tasks/paper_text.yaml`` and ``tasks/paper_multimodal.yaml`` list the papers' Hub-based
suites (:func:`paper_suite`).

Example::

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    tm = text_task_manager()
    res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=list(OFFLINE_TEXT_TASKS),
                          task_manager=tm, limit=50)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO_ROOT / "tasks"
LM_EVAL_TASKS_DIR = TASKS_DIR / "lm_eval"
LMMS_EVAL_TASKS_DIR = TASKS_DIR / "lmms_eval"

OFFLINE_TEXT_GROUP = "mcmoe_text_offline"
OFFLINE_TEXT_PPL_TASKS = ("mcmoe_source_ppl", "mcmoe_prose_ppl")  # in domain (held-out files), out of domain
OFFLINE_TEXT_MC_TASKS = ("mcmoe_docstring_cloze", "mcmoe_docstring_ending", "mcmoe_docstring_word_order")
OFFLINE_TEXT_TASKS = OFFLINE_TEXT_PPL_TASKS + OFFLINE_TEXT_MC_TASKS

OFFLINE_VQA_GROUP = "mcmoe_vqa_offline"
OFFLINE_VQA_GEN_TASKS = ("mcmoe_vqa_colour", "mcmoe_vqa_shape", "mcmoe_vqa_count", "mcmoe_vqa_digit",
                         "mcmoe_vqa_reading")
OFFLINE_VQA_MC_TASKS = ("mcmoe_vqa_position_mc", "mcmoe_vqa_colour_mc", "mcmoe_vqa_shape_mc", "mcmoe_vqa_digit_mc")
OFFLINE_VQA_TASKS = OFFLINE_VQA_GEN_TASKS + OFFLINE_VQA_MC_TASKS


def _check_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"task directory {path} not found; the offline suites ship in the repository's "
                                "tasks/ directory (run from a clone, or pass tasks_dir)")
    return path


def text_task_manager(*, include_defaults: bool = False, tasks_dir: str | Path | None = None) -> Any:
    """An lm-eval ``TaskManager`` that knows the offline text tasks (and lm-eval's own tasks when
    ``include_defaults``; indexing those takes about 17 s)."""
    from lm_eval.tasks import TaskManager

    path = _check_dir(Path(tasks_dir) if tasks_dir else LM_EVAL_TASKS_DIR)
    return TaskManager(include_path=str(path), include_defaults=include_defaults)


def lmms_task_manager(*, include_defaults: bool = False, tasks_dir: str | Path | None = None) -> Any:
    """An lmms-eval ``TaskManager`` that knows the offline image-question tasks."""
    from lmms_eval.tasks import TaskManager

    path = _check_dir(Path(tasks_dir) if tasks_dir else LMMS_EVAL_TASKS_DIR)
    return TaskManager(include_path=str(path), include_defaults=include_defaults)


def paper_suite(name: str) -> dict[str, Any]:
    """The papers' Hub-based suite ``name`` ("text" or "multimodal") from ``tasks/paper_<name>.yaml``."""
    valid = ("text", "multimodal")
    if name not in valid:
        raise ValueError(f"unknown paper suite {name!r}; valid: {', '.join(valid)}")
    return yaml.safe_load((TASKS_DIR / f"paper_{name}.yaml").read_text(encoding="utf-8"))
