"""Image+text calibration samples, whatever the model family: the data a vision-language adapter turns into model
inputs (:meth:`model_adapters.base.MoEAdapter.calibration_batches`).

A JSONL file holds one sample per line: ``{"text": ..., "image": "path" | ["path", ...], "answer": ...}`` (image
paths relative to the file; ``answer`` optional)::

    samples = load_image_text_samples("calib/vqa.jsonl")
    batches = adapter.calibration_batches(processor, samples, batch_size=4)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ImageTextSample:
    """One calibration sample: a user text with image tags (prepended when absent), its images, and an optional
    answer (then the sample is a full exchange, as in supervised data)."""

    text: str
    images: list[Any] = field(default_factory=list)  # PIL images or paths
    answer: str | None = None


def load_image_text_samples(path: str | Path) -> list[ImageTextSample]:
    """Samples from a JSONL file: one object per line with ``text``, ``image`` (a path or a list of paths,
    relative to the file) and optionally ``answer``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration samples file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "text" not in rec:
            raise ValueError(f"{path}:{n}: no 'text'")
        imgs = rec.get("image") or rec.get("images") or []
        imgs = [imgs] if isinstance(imgs, str) else list(imgs)
        out.append(ImageTextSample(rec["text"], [str(path.parent / p) for p in imgs], rec.get("answer")))
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def open_image(img: Any) -> Any:
    """A PIL RGB image from a path, or ``img`` itself when it is already an image."""
    from PIL import Image

    return Image.open(img).convert("RGB") if isinstance(img, (str, Path)) else img
