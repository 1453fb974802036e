"""Offline lmms-eval task data: held-out image questions as JSON lines with the PNG inline (``tasks/lmms_eval/data``).

One file per :class:`~.images.VQATask` (``{task}.jsonl``), ``n`` held-out samples each (:func:`.images.vqa_samples`,
split "heldout"): ``{"id", "task", "question", "answer", "choices", "label", "image"}`` where ``image`` is the PNG
base64 and ``label`` the answer's index in ``choices``. The generation tasks score exact match against ``answer``,
the multiple-choice tasks pick among ``choices`` by log-likelihood. ``manifest.json`` records the sha256 of each
file and the library versions that rendered them (images are shipped, so evaluation does not depend on them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import Any

from mcmoe_vl.io import write_json_atomic

from .images import VQATask, image_to_b64, vqa_samples

logger = logging.getLogger(__name__)


def build_vqa_task_files(out_dir: str | Path, *, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Write ``{task}.jsonl`` for every task into ``out_dir``; returns the manifest."""
    import PIL
    import sklearn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"seed": seed, "python_version": platform.python_version(),
                                "pillow_version": PIL.__version__, "sklearn_version": sklearn.__version__,
                                "files": {}}
    for task in VQATask:
        rows = []
        for i, s in enumerate(vqa_samples(task, "heldout", n, seed=seed)):
            rows.append({"id": f"{task.value}-{i:04d}", "task": task.value, "question": s.question,
                         "answer": s.answer, "choices": list(s.choices), "label": s.choices.index(s.answer),
                         "image": image_to_b64(s.image)})
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        path = out / f"{task.value}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(data, encoding="utf-8")
        tmp.replace(path)
        manifest["files"][path.name] = {"rows": len(rows), "sha256": hashlib.sha256(data.encode()).hexdigest()}
        logger.info("%s: %d rows", path.name, len(rows))
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
