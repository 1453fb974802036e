"""Offline image questions: determinism, split separation, answers, the shipped lmms-eval files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mcmoe_vl.data.images import (CLASSES, IMAGE_SIZE, VQATask, blank_like, digit_split, image_from_b64,
                                  image_to_b64, vqa_samples)

VQA_DATA = Path(__file__).resolve().parents[1] / "tasks" / "lmms_eval" / "data"


def test_samples_are_deterministic_and_answers_valid():
    for task in VQATask:
        a = vqa_samples(task, "train", 12)
        b = vqa_samples(task, "train", 12)
        assert [s.answer for s in a] == [s.answer for s in b]
        assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
        assert all(s.answer in CLASSES[task] and s.image.size == (IMAGE_SIZE, IMAGE_SIZE) for s in a)
        assert len({s.answer for s in vqa_samples(task, "train", 60)}) >= 3  # not one constant answer


def test_train_and_heldout_differ():
    tr, he = digit_split()
    assert not set(tr) & set(he) and len(tr) + len(he) == 1797
    for task in (VQATask.COLOUR, VQATask.COUNT, VQATask.READING):
        a = {np.asarray(s.image).tobytes() for s in vqa_samples(task, "train", 50)}
        b = {np.asarray(s.image).tobytes() for s in vqa_samples(task, "heldout", 50)}
        assert not a & b


def test_images_carry_the_answer():
    # colour: the named colour's pixels are present; blank ablation: one uniform colour
    from mcmoe_vl.data.images import COLOURS

    for s in vqa_samples(VQATask.COLOUR, "heldout", 10):
        px = np.asarray(s.image).reshape(-1, 3).astype(int)
        target = np.array(COLOURS[s.answer])
        assert (np.abs(px - target).sum(1) < 10).sum() > 20
        assert len(np.unique(np.asarray(blank_like(s.image)).reshape(-1, 3), axis=0)) == 1


def test_png_round_trip():
    s = vqa_samples(VQATask.DIGIT, "heldout", 1)[0]
    assert np.array_equal(np.asarray(image_from_b64(image_to_b64(s.image))), np.asarray(s.image))


def test_shipped_vqa_files_match_their_manifest():
    manifest = json.loads((VQA_DATA / "manifest.json").read_text())
    assert set(manifest["files"]) == {f"{t.value}.jsonl" for t in VQATask}
    for name, info in manifest["files"].items():
        data = (VQA_DATA / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], name
        rows = [json.loads(line) for line in data.decode().splitlines()]
        assert len(rows) == info["rows"] >= 100
        for r in rows[:20]:
            assert r["choices"][r["label"]] == r["answer"]
            assert image_from_b64(r["image"]).size == (IMAGE_SIZE, IMAGE_SIZE)
