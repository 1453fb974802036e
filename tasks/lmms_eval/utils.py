"""Helpers for the offline lmms-eval tasks in this directory (lmms-eval 0.7 task format).

The data files are in ``data/`` next to this file. lmms-eval hands ``dataset_kwargs`` to ``datasets.load_dataset``,
which resolves relative ``data_files`` against the working directory; the tasks therefore name
``class: !function utils.LocalVQATask``, a ``ConfigurableTask`` that resolves them against ``data/`` instead, so
the suite runs wherever the repository is cloned.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

from lmms_eval.api.task import ConfigurableTask
from PIL import Image

DATA = Path(__file__).resolve().parent / "data"


class LocalVQATask(ConfigurableTask):
    """A ``ConfigurableTask`` whose relative ``data_files`` are files in this directory's ``data/``."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config, **kwargs)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        kwargs = dict(dataset_kwargs or {})
        files = kwargs.get("data_files")
        if isinstance(files, dict):
            kwargs["data_files"] = {split: self._resolve(f) for split, f in files.items()}
        elif files is not None:
            kwargs["data_files"] = self._resolve(files)
        super().download(kwargs)

    @staticmethod
    def _resolve(name: str) -> str:
        path = Path(name)
        path = path if path.is_absolute() else DATA / path
        if not path.is_file():
            raise FileNotFoundError(f"task data file {path} is missing (rebuild: python -m mcmoe_vl.data.build_tasks)")
        return str(path)


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The sample's image (PNG, base64 in the ``image`` field)."""
    return [Image.open(io.BytesIO(base64.b64decode(doc["image"]))).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question (the model template puts the image first)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return list(doc["choices"])


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def exact_match(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the generated answer equals the reference (case and punctuation ignored)."""
    return {"exact_match": float(_normalise(results[0]) == _normalise(doc["answer"]))}
