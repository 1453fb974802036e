"""Dataset loaders for the offline lm-eval tasks in this directory (``custom_dataset: !function utils.<name>``).

The data files live in ``data/`` next to this file, so the tasks work wherever the repository is cloned. lm-eval
calls each loader with the task's ``metadata`` and ``dataset_kwargs`` as keyword arguments (ignored here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str) -> dict[str, Any]:
    import datasets

    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"task data file {path} is missing (rebuild: python -m mcmoe_vl.data.build_tasks)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def docstrings(**kwargs: Any) -> dict[str, Any]:
    """Held-out standard-library docstrings (in-domain perplexity)."""
    return _load("docstrings_heldout.jsonl")


def code(**kwargs: Any) -> dict[str, Any]:
    """Held-out modules' source with docstrings stripped (out-of-domain perplexity)."""
    return _load("code_heldout.jsonl")


def source(**kwargs: Any) -> dict[str, Any]:
    """Held-out Python source files of the corpus (in-domain perplexity of the source-trained model)."""
    return _load("source_heldout.jsonl")


def prose(**kwargs: Any) -> dict[str, Any]:
    """Installed distributions' READMEs (out-of-domain English prose)."""
    return _load("prose_ood.jsonl")


def cloze(**kwargs: Any) -> dict[str, Any]:
    """Next-word cloze over held-out docstrings."""
    return _load("cloze.jsonl")


def ending(**kwargs: Any) -> dict[str, Any]:
    """Passage ending over held-out docstrings."""
    return _load("ending.jsonl")


def word_order(**kwargs: Any) -> dict[str, Any]:
    """Original sentence against word-swapped copies."""
    return _load("word_order.jsonl")
