"""The source-code training corpus (mcmoe_vl.data.corpus): each rule on a small synthetic tree, and on the real
standard library the guarantee the text tasks rely on: their held-out modules never train."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mcmoe_vl.data import corpus as C
from mcmoe_vl.data.text import is_heldout, stdlib_dir, stdlib_splits
from mcmoe_vl.data.tokenizer import EOS_ID


def _write(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text.encode() if isinstance(text, str) else text)


def _module(i: int, extra: str = "") -> str:
    body = "\n".join(f"    value_{i}_{k} = compute_something_specific({i}, {k}, 'distinctive line {i} {k}')"
                     for k in range(40))
    return f'"""Module {i}."""\n\ndef f_{i}():\n{body}\n{extra}'


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "lib"
    for i in range(60):
        _write(root, f"pkg/mod_{i:02d}.py", _module(i))
    _write(root, "pkg/tests/test_x.py", _module(100))
    _write(root, "pkg/test_y.py", _module(101))
    _write(root, "pkg/conftest.py", _module(102))
    _write(root, "pkg/big.py", "x = 1\n" * (C.MAX_FILE_BYTES // 6 + 10))
    _write(root, "pkg/table.py", "T = [" + "1, " * 600 + "]\n")
    _write(root, "pkg/latin1.py", b"# caf\xe9\nx = 1\n")
    _write(root, "pkg/empty.py", "\n\n")
    _write(root, "vendored/copy_of_mod_03.py", _module(3))  # exact copy: dropped as a duplicate
    site = tmp_path / "site"
    _write(site, "a-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: a\n\n" + "Plain English prose. " * 40)
    _write(site, "b-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: b\n\n" + "Plain English prose. " * 40)
    _write(site, "c-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: c\n\nshort")
    _write(site, "mcmoe_vl-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: mcmoe_vl\n\n" + "Own. " * 200)
    return root, site


def _split(tree, **kw):
    root, site = tree
    kw.setdefault("reserved_names", frozenset({"lib/pkg/mod_00.py"}))
    return C.corpus_splits([("lib", root)], heldout_fraction=0.2, ood_site=site, **kw)


def test_every_rule_on_a_small_tree(tree):
    c = _split(tree)
    names = {key: [f.name for f in getattr(c, key)] for key in ("train", "heldout", "reserved", "dropped")}
    everything = sum(names.values(), [])
    assert len(everything) == len(set(everything)) == 60  # each kept module in exactly one split
    assert not any("test" in n or "conftest" in n or n.endswith(("big.py", "table.py", "latin1.py", "empty.py"))
                   for n in everything)
    assert c.skipped == {"tests or cache": 3, "too large": 1, "long line": 1, "not utf-8": 1, "empty": 1,
                         "duplicate": 1}
    assert names["reserved"] == ["lib/pkg/mod_00.py"]
    expected_held = [f"lib/pkg/mod_{i:02d}.py" for i in range(1, 60)
                     if is_heldout(f"lib/pkg/mod_{i:02d}.py", fraction=0.2)]
    assert names["heldout"] == expected_held and 3 <= len(expected_held) <= 25  # the path-hash rule, non-vacuous
    assert names["train"] == sorted(names["train"])  # source order
    # b duplicates a, c is too short, this project's own README is left out
    assert [d.name for d in c.ood] == ["metadata/a-1.0.dist-info"]


def test_near_copies_of_unseen_files_never_train(tree):
    root, _ = tree
    i = next(i for i in range(4, 60) if is_heldout(f"lib/pkg/mod_{i:02d}.py", fraction=0.2))
    a, b = [n for n in (f"lib/vendored/patched_{k}.py" for k in range(20)) if not is_heldout(n, fraction=0.2)][:2]
    _write(root, a[4:], _module(i, extra="# locally patched\n"))  # not byte-identical
    _write(root, b[4:], _module(0, extra="x = 2\n"))
    licence = "# Licensed under the Apache License, Version 2.0 (the 'License'); see LICENSE\n"
    for k in range(8):  # boilerplate shared with the held-out file must not drop a file
        _write(root, f"other/lic_{k}.py", licence + f"y_{k} = {k}\n")
    _write(root, f"pkg/mod_{i:02d}.py", licence + _module(i))
    c = _split(tree)
    dropped = {f.name for f in c.dropped}
    assert dropped == {a, b}
    lic = {f"lib/other/lic_{k}.py" for k in range(8)} - {f.name for f in c.heldout}
    assert len(lic) >= 4 and lic <= {f.name for f in c.train}


def test_build_writes_the_splits_and_a_manifest_that_hashes_them(tree, tmp_path, monkeypatch):
    c = _split(tree)
    monkeypatch.setattr(C, "corpus_splits", lambda **kw: c)
    out = tmp_path / "corpus"
    m = C.build_corpus(out)
    monkeypatch.undo()
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert m["train_tokens"] == tokens.size == sum(len(f.text.encode()) + 1 for f in c.train)
    assert (tokens == EOS_ID).sum() == len(c.train) and tokens[-1] == EOS_ID
    first = c.train[0].text.encode()
    assert bytes(tokens[: len(first)].astype(np.uint8)) == first
    for key in ("heldout", "reserved", "ood"):
        docs = C.load_jsonl(out / f"{key}.jsonl")
        assert docs == getattr(c, key)
        h = hashlib.sha256(b"".join(d.text.encode() + b"\x00" for d in docs)).hexdigest()
        assert m["splits"][key]["sha256"] == h and m["splits"][key]["documents"] == len(docs)
    assert json.loads((out / "manifest.json").read_text()) == m
    assert C.manifest_of(_split(tree), seed=0, heldout_fraction=C.DEFAULT_HELDOUT_FRACTION)["splits"] == \
        m["splits"]  # deterministic


def test_bad_fraction_is_refused(tree):
    with pytest.raises(ValueError, match="heldout_fraction"):
        C.corpus_splits([], heldout_fraction=1.5)


def test_the_text_tasks_held_out_modules_never_train_on_the_real_stdlib():
    c = C.corpus_splits([("stdlib", stdlib_dir())], ood_site=stdlib_dir())
    task_modules = {f"stdlib/{d.name}" for d in stdlib_splits().heldout}
    train = {f.name for f in c.train}
    assert task_modules and not task_modules & train
    assert {f.name for f in c.reserved} == task_modules
    reserved_texts = {f.text for f in c.reserved}
    assert not any(f.text in reserved_texts for f in c.train)
    assert len(c.train) > 300 and c.heldout  # not vacuous


def test_shipped_corpus_task_files_match_their_manifest_and_stay_apart():
    from mcmoe_vl.data import calibration_token_ids
    from mcmoe_vl.data.tasks import LM_EVAL_TASKS_DIR, text_task_manager

    data = LM_EVAL_TASKS_DIR / "data"
    m = json.loads((data / "corpus_manifest.json").read_text())
    rows = {}
    for name, rec in m["files"].items():
        raw = (data / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == rec["sha256"], name
        rows[name] = [json.loads(line) for line in raw.decode().splitlines()]
        assert len(rows[name]) == rec["rows"] > 50, name
    assert len(rows["source_heldout.jsonl"]) == m["corpus"]["splits"]["heldout"]["documents"]  # every held-out file
    train = {r["module"] for r in rows["source_train_sample.jsonl"]}
    assert not train & {r["module"] for r in rows["source_heldout.jsonl"]}
    assert not train & {f"stdlib/{d.name}" for d in stdlib_splits().heldout}
    ids = calibration_token_ids("source")
    assert int((ids == EOS_ID).sum()) == len(rows["source_train_sample.jsonl"])
    assert {"mcmoe_source_ppl", "mcmoe_prose_ppl"} <= set(text_task_manager().all_tasks)
    uni = m["unigram_counts"]  # the training split's byte counts: every byte plus one end-of-text per file
    raw = (data / uni["file"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == uni["sha256"]
    train_split = m["corpus"]["splits"]["train"]
    assert sum(json.loads(raw)["counts"]) == uni["tokens"] == train_split["bytes"] + train_split["documents"]
