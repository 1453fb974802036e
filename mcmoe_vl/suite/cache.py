"""Stage cache: every stage's artifacts live in a directory named by a hash of the stage's inputs.

``<run_dir>/<stage>/<key>/`` holds the artifacts; ``stage.json`` in it is written last (atomically) and lists each
artifact file with its size and SHA-256. A stage is reused only when that record exists and every listed file still
has its recorded size and hash, so a run interrupted while writing (or a file edited or truncated since) is redone,
never trusted. The key hashes the stage's inputs as canonical JSON (sorted keys), including the keys of the stages
it depends on, so a change anywhere upstream changes every key downstream.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mcmoe_vl.io import checkpoint_fingerprint, file_sha256, write_json_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1
RECORD = "stage.json"

__all__ = ["StageCache", "canonical_json", "checkpoint_fingerprint", "file_sha256", "stage_key"]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(stage: str, inputs: Any) -> str:
    """16 hex digits of SHA-256 over the stage name, the cache version and the inputs (canonical JSON)."""
    payload = canonical_json({"cache_version": CACHE_VERSION, "stage": stage, "inputs": inputs})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class StageCache:
    """Artifacts of one run directory, by stage and input key."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Exclusive use of one stage directory among processes sharing the run directory (``flock`` on
        ``<stage>/<key>.lock``): a second process waits, then finds the stage done and reuses it."""
        path = self.root / stage / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        """The stage record when the stage finished and its files are intact, else None (and why, in the log)."""
        d = self.dir(stage, key)
        rec_path = d / RECORD
        if not rec_path.is_file():
            if d.exists():
                log.info("%s/%s: no completion record (interrupted earlier): redoing the stage", stage, key)
            return None
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s: unreadable stage record: redoing the stage", rec_path)
            return None
        if rec.get("cache_version") != CACHE_VERSION or rec.get("stage") != stage or rec.get("key") != key:
            log.warning("%s: record of another stage or cache version: redoing the stage", rec_path)
            return None
        for name, meta in rec.get("files", {}).items():
            f = d / name
            if not f.is_file() or f.stat().st_size != meta["bytes"] or file_sha256(f) != meta["sha256"]:
                log.warning("%s/%s: artifact %s is missing or changed since it was written: redoing the stage",
                            stage, key, name)
                return None
        return rec

    def begin(self, stage: str, key: str) -> Path:
        """A fresh directory for the stage (a stale one without a valid record is cleared first)."""
        d = self.dir(stage, key)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def commit(self, stage: str, key: str, *, inputs: Any, files: list[str], info: dict[str, Any] | None = None
               ) -> dict[str, Any]:
        """Write the completion record listing ``files`` (relative to the stage directory) with sizes and hashes."""
        d = self.dir(stage, key)
        listed = {}
        for name in sorted(files):
            f = d / name
            if not f.is_file():
                raise FileNotFoundError(f"stage {stage}: artifact {f} was not written")
            listed[name] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        rec = {"cache_version": CACHE_VERSION, "stage": stage, "key": key, "inputs": inputs, "files": listed,
               "info": info or {}}
        write_json_atomic(d / RECORD, rec)
        return rec
