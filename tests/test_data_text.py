"""The offline text data: byte tokenizer round trips, the module-level split, paragraph chunking, shipped files."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from mcmoe_vl.data.lm_tasks import chunk_paragraphs
from mcmoe_vl.data.text import is_heldout, parse_module
from mcmoe_vl.data.tokenizer import BYTE_VOCAB, EOS_ID, PAD_ID, VOCAB_SIZE, byte_tokenizer, encode_bytes

LM_DATA = Path(__file__).resolve().parents[1] / "tasks" / "lm_eval" / "data"


def _random_text(rng: random.Random, n: int) -> str:
    pools = [(0x00, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0x1F300, 0x1F6FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_byte_tokenizer_round_trips_arbitrary_utf8(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_tokenizer()
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(0)
    texts = [_random_text(rng, 200) for _ in range(20)] + ["", "  two  spaces\n\ttab", "\x00nul", "é日本🙂"]
    for t in texts:
        for k in (tok, loaded):
            ids = k(t, add_special_tokens=False)["input_ids"]
            assert ids == encode_bytes(t) == list(t.encode("utf-8"))  # id == byte value
            assert k.decode(ids) == t
    assert len(loaded) == VOCAB_SIZE == BYTE_VOCAB + 4
    assert (loaded.pad_token_id, loaded.eos_token_id) == (PAD_ID, EOS_ID)


def test_parse_module_separates_docstrings_from_code():
    src = '"""Module doc."""\nimport os\n\nclass A:\n    """Class doc."""\n    def f(self):\n        """F doc."""\n' \
          '        return 1\n\ndef g():\n    # comment\n    return 2\n'
    doc = parse_module(src, "m.py")
    assert doc.docstrings == "Module doc.\n\nClass doc.\n\nF doc."
    assert "doc" not in doc.code and "comment" not in doc.code
    assert "return 1" in doc.code and "import os" in doc.code
    assert parse_module("x = 1\n", "n.py") is None  # no docstring
    assert parse_module("def (:\n", "bad.py") is None  # does not parse


def test_heldout_split_is_by_module_and_seeded():
    names = [f"pkg/mod_{i}.py" for i in range(2000)]
    held = [n for n in names if is_heldout(n, seed=0, fraction=0.1)]
    assert 0.07 < len(held) / len(names) < 0.13
    assert held == [n for n in names if is_heldout(n, seed=0, fraction=0.1)]  # deterministic
    assert held != [n for n in names if is_heldout(n, seed=1, fraction=0.1)]  # the seed matters


def test_chunk_paragraphs_respects_the_byte_bound():
    rng = random.Random(1)
    text = "\n\n".join(" ".join("w" * rng.randint(1, 12) for _ in range(rng.randint(1, 80))) for _ in range(50))
    chunks = chunk_paragraphs(text, 300)
    assert all(0 < len(c.encode()) <= 300 for c in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_shipped_lm_task_files_match_their_manifest():
    manifest = json.loads((LM_DATA / "manifest.json").read_text())
    assert manifest["files"], "empty manifest"
    for name, info in manifest["files"].items():
        data = (LM_DATA / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], name
        rows = [json.loads(line) for line in data.decode().splitlines()]
        assert len(rows) == info["rows"] >= 100, name
        if "choices" in rows[0]:
            for r in rows:
                assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
            labels = [r["label"] for r in rows]
            assert max(labels.count(k) for k in range(4)) < 0.4 * len(rows)  # answers not all in one slot
    held = set(manifest["heldout_modules"])
    docs = [json.loads(line) for line in (LM_DATA / "docstrings_heldout.jsonl").read_text().splitlines()]
    assert {d["module"] for d in docs} <= held


@pytest.mark.parametrize("name", ["cloze.jsonl", "ending.jsonl", "word_order.jsonl"])
def test_multiple_choice_answers_come_from_the_passage(name):
    rows = [json.loads(line) for line in (LM_DATA / name).read_text().splitlines()]
    docs = "\n".join(json.loads(line)["text"] for line in (LM_DATA / "docstrings_heldout.jsonl").read_text()
                     .splitlines())
    flat = " ".join(docs.split())
    sep = "" if name == "ending.jsonl" else " "  # the ending task's context stops inside a word
    hits = sum((r["context"] + sep + r["choices"][r["label"]]) in flat for r in rows[:50])
    assert hits >= 45  # the true continuation follows the context in the held-out text
