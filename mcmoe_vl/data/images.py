"""Offline image question answering: real handwritten digits and Pillow-rendered scenes, seeded train / held-out.

Sources (nothing is downloaded):

* ``digit``: scikit-learn's 1,797 real 8 x 8 handwritten digits (UCI optdigits test set, shipped with
  scikit-learn), upscaled; split by image index with a seeded permutation (``DIGIT_HELDOUT_FRACTION`` held out).
* rendered scenes (Pillow): ``colour`` (one shape, name its colour), ``shape`` (one shape, name it), ``count``
  (1-5 shapes of one kind, count them), ``position`` (one shape in a quadrant), ``reading`` (a short word drawn in
  the default font). Train and held-out scenes come from different seeds (``split_seed``), so held-out images are
  new draws, never copies of training images.

Each :class:`VQASample` carries the task, the image, the question, the answer and the answer's class list (the
choices for multiple-choice scoring). Images are ``image_size`` x ``image_size`` RGB.
"""

from __future__ import annotations

import base64
import enum
import io
import math
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 56
DIGIT_HELDOUT_FRACTION = 0.2

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20),
    "purple": (140, 40, 180), "orange": (250, 130, 0), "black": (20, 20, 20), "pink": (250, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("1", "2", "3", "4", "5")
DIGITS = tuple(str(d) for d in range(10))
WORDS = ("cat", "dog", "sun", "box", "car", "hat", "pen", "cup", "map", "bus")


class VQATask(str, enum.Enum):
    COLOUR = "colour"
    SHAPE = "shape"
    COUNT = "count"
    POSITION = "position"
    DIGIT = "digit"
    READING = "reading"


QUESTIONS: dict[VQATask, str] = {
    VQATask.COLOUR: "What colour is the shape?",
    VQATask.SHAPE: "What shape is this?",
    VQATask.COUNT: "How many shapes are there?",
    VQATask.POSITION: "Where is the shape?",
    VQATask.DIGIT: "Which digit is this?",
    VQATask.READING: "What word is written?",
}
CLASSES: dict[VQATask, tuple[str, ...]] = {
    VQATask.COLOUR: tuple(COLOURS), VQATask.SHAPE: SHAPES, VQATask.COUNT: COUNTS, VQATask.POSITION: POSITIONS,
    VQATask.DIGIT: DIGITS, VQATask.READING: WORDS,
}


@dataclass(frozen=True)
class VQASample:
    """One image question with its answer; ``choices`` are the task's classes (the answer is one of them)."""

    task: VQATask
    image: Image.Image
    question: str
    answer: str

    @property
    def choices(self) -> tuple[str, ...]:
        return CLASSES[self.task]


def _background(rng: random.Random, size: int) -> Image.Image:
    g = rng.randint(225, 255)
    return Image.new("RGB", (size, size), (g, g, g))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               colour: tuple[int, int, int]) -> None:
    """Draw a filled ``shape`` of radius ``r`` centred on (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * math.sqrt(3) / 2, cy + r / 2), (cx - r * math.sqrt(3) / 2, cy + r / 2)],
                     fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=colour)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render_single(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, str, str, str]:
    """One shape of random kind, colour, size and place: (image, colour, shape, quadrant)."""
    img = _background(rng, size)
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    r = rng.uniform(0.14, 0.22) * size
    quad = rng.randrange(4)
    half = size / 2
    cx = (quad % 2) * half + rng.uniform(r + 1, half - r - 1)
    cy = (quad // 2) * half + rng.uniform(r + 1, half - r - 1)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
    return img, colour, shape, POSITIONS[quad]


def render_count(rng: random.Random, n: int, size: int = IMAGE_SIZE) -> Image.Image:
    """``n`` non-overlapping shapes of one kind and colour (cells of a 3 x 3 grid, jittered)."""
    img = _background(rng, size)
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    cell = size / 3
    r = cell * 0.3
    draw = ImageDraw.Draw(img)
    for c in rng.sample(range(9), n):
        cx = (c % 3 + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        cy = (c // 3 + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
    return img


@lru_cache(maxsize=4)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def render_word(rng: random.Random, word: str, size: int = IMAGE_SIZE) -> Image.Image:
    """``word`` in Pillow's default font, dark ink, random size and offset."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    font = _font(rng.choice((14, 16, 18)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    x = rng.uniform(1, max(1.0, size - w - 1)) - left
    y = rng.uniform(1, max(1.0, size - h - 1)) - top
    ink = rng.randint(0, 60)
    draw.text((x, y), word, fill=(ink, ink, ink), font=font)
    return img


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)  # (1797, 8, 8) in [0, 16], (1797,)


def digit_split(seed: int = 0) -> tuple[list[int], list[int]]:
    """Train / held-out indices of scikit-learn's digits (seeded permutation)."""
    n = len(_digits()[1])
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * DIGIT_HELDOUT_FRACTION))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def render_digit(index: int, size: int = IMAGE_SIZE) -> tuple[Image.Image, str]:
    """scikit-learn digit ``index`` as dark ink on white, bilinearly upscaled to ``size``: (image, label)."""
    images, labels = _digits()
    x = 255 - (images[index] / 16.0 * 255).round().astype(np.uint8)
    img = Image.fromarray(x, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
    return img, str(int(labels[index]))


def make_sample(task: VQATask, rng: random.Random, *, digit_index: int | None = None,
                size: int = IMAGE_SIZE) -> VQASample:
    """One sample of ``task`` drawn with ``rng`` (``digit_index`` picks the digit image for ``digit``)."""
    task = VQATask(task)
    q = QUESTIONS[task]
    if task is VQATask.DIGIT:
        if digit_index is None:
            raise ValueError("digit samples need digit_index")
        img, label = render_digit(digit_index, size)
        return VQASample(task, img, q, label)
    if task is VQATask.COUNT:
        n = rng.randint(1, 5)
        return VQASample(task, render_count(rng, n, size), q, str(n))
    if task is VQATask.READING:
        word = rng.choice(WORDS)
        return VQASample(task, render_word(rng, word, size), q, word)
    img, colour, shape, pos = render_single(rng, size)
    answer = {VQATask.COLOUR: colour, VQATask.SHAPE: shape, VQATask.POSITION: pos}[task]
    return VQASample(task, img, q, answer)


_SPLIT_SEEDS = {"train": 1, "heldout": 2}


def vqa_samples(task: VQATask | str, split: str, n: int, *, seed: int = 0, size: int = IMAGE_SIZE) -> list[VQASample]:
    """``n`` samples of ``task`` from ``split`` ("train" or "heldout"), deterministic in (task, split, seed).

    Digits cycle through the split's image indices in a seeded order; rendered scenes are fresh seeded draws.
    """
    task = VQATask(task)
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split={split!r}; valid: {', '.join(_SPLIT_SEEDS)}")
    rng = random.Random(f"{seed}:{split}:{task.value}")
    if task is VQATask.DIGIT:
        idx = digit_split(seed)[0 if split == "train" else 1]
        order = idx[:]
        rng.shuffle(order)
        return [make_sample(task, rng, digit_index=order[i % len(order)], size=size) for i in range(n)]
    return [make_sample(task, rng, size=size) for _ in range(n)]


def blank_like(image: Image.Image) -> Image.Image:
    """A uniform image of the same size (mid grey): the blank-image ablation."""
    return Image.new("RGB", image.size, (128, 128, 128))


def image_to_b64(image: Image.Image) -> str:
    """PNG bytes of ``image``, base64 (for JSON-lines task files)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(data: str) -> Image.Image:
    """The inverse of :func:`image_to_b64` (RGB)."""
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
