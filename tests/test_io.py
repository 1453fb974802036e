"""Atomic artifact writes: all or nothing, ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from mcmoe_vl.io import atomic_path, read_json, write_json_atomic


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "stats.json"
    write_json_atomic(dest, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text('{"a": 2, "trunc')
            raise RuntimeError("interrupted")
    assert read_json(dest) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_artifacts_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "plan.json", {"b": [1, 2]})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_truncated_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('{"results": {')
    with pytest.raises(ValueError, match="not valid JSON.*truncated"):
        read_json(bad, what="results file")
    with pytest.raises(FileNotFoundError, match="results file not found"):
        read_json(tmp_path / "missing.json", what="results file")
