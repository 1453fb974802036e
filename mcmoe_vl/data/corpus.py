"""The source-code corpus that trains the embedded language model: every Python file that ships on the machine.

A fresh machine set up from the lock holds the same files, so the corpus is rebuilt, not downloaded. The rule:

1. **Sources.** ``*.py`` files under the interpreter's standard library (label ``stdlib/``) and under the
   environment's ``site-packages`` (label ``site/``), in sorted label-path order. Test suites, caches and the
   interpreter's own ``site-packages`` below the standard library are skipped, and so are files that are not UTF-8,
   larger than ``MAX_FILE_BYTES`` or with a line longer than ``MAX_LINE_BYTES`` (generated tables, not written by
   people).
2. **Deduplication.** A file whose exact content was seen earlier in the order is dropped (vendored copies).
3. **Reserved.** The standard-library modules that the text tasks hold out (:func:`.text.stdlib_splits`,
   ``heldout``) never train: they go to the ``reserved`` split.
4. **Held out.** A file is held out when ``sha256(f"{seed}:{label}/{path}")`` falls below ``heldout_fraction`` of
   the hash range (:func:`.text.is_heldout`): the rule depends on the path only.
5. **No near copies.** A training file that shares many long lines with a held-out or reserved file (a modified
   vendored copy) is moved to ``dropped``: at least ``NEAR_COPY_LINES`` lines of 40 bytes or more, or a quarter
   of its long lines (at least 8). Only distinctive lines count: a line found in more than ``MAX_SPREAD``
   candidate files (a licence header, a common import) is boilerplate.
6. **Out of domain.** English prose that ships with the packages: the long description in each installed
   distribution's ``METADATA`` (its README), deduplicated, never trained on.

:func:`build_corpus` writes the splits (``train.bin``: UTF-8 bytes of the training files, each followed by
``EOS_ID``, as uint16; ``heldout.jsonl``, ``reserved.jsonl``, ``ood.jsonl``: one document per line) and a
``manifest.json`` with each split's size, document count and sha256. The training script records the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import sysconfig
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mcmoe_vl.io import write_json_atomic

from .text import is_heldout, stdlib_dir, stdlib_splits
from .tokenizer import EOS_ID

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_HELDOUT_FRACTION = 0.03
MAX_FILE_BYTES = 256_000
MAX_LINE_BYTES = 1_000
NEAR_COPY_LINES = 30
MAX_SPREAD = 3
_LONG_LINE = 40
_SKIP_PARTS = frozenset({"test", "tests", "testing", "idle_test", "__pycache__", "site-packages", "dist-packages",
                         "lib2to3", "turtledemo"})


@dataclass(frozen=True)
class SourceFile:
    """One kept file: ``name`` is ``label/relative path``."""

    name: str
    text: str


@dataclass
class Corpus:
    """The splits of :func:`corpus_splits` (documents in source order)."""

    train: list[SourceFile] = field(default_factory=list)
    heldout: list[SourceFile] = field(default_factory=list)
    reserved: list[SourceFile] = field(default_factory=list)
    dropped: list[SourceFile] = field(default_factory=list)
    ood: list[SourceFile] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def site_packages_dir() -> Path:
    """The running environment's ``site-packages`` (pure-Python library directory)."""
    return Path(sysconfig.get_paths()["purelib"])


def default_roots() -> list[tuple[str, Path]]:
    """``[("stdlib", ...), ("site", ...)]`` for the running interpreter and environment."""
    return [("stdlib", stdlib_dir()), ("site", site_packages_dir())]


def _skip_path(rel: Path) -> bool:
    if any(p in _SKIP_PARTS or p.startswith("test_") or p.startswith("__editable__") for p in rel.parts):
        return True
    return rel.name.endswith("_test.py") or rel.name == "conftest.py"


def _skip_reason(data: bytes) -> str | None:
    if len(data) > MAX_FILE_BYTES:
        return "too large"
    if not data.strip():
        return "empty"
    if max(len(line) for line in data.split(b"\n")) > MAX_LINE_BYTES:
        return "long line"
    return None


def iter_source_files(roots: Iterable[tuple[str, Path]], skipped: dict[str, int]) -> Iterable[SourceFile]:
    """Kept ``*.py`` files of every root in sorted ``label/path`` order (rule 1); counts skips by reason."""
    entries = []
    for label, root in roots:
        for p in root.rglob("*.py"):
            rel = p.relative_to(root)
            if _skip_path(rel):
                skipped["tests or cache"] = skipped.get("tests or cache", 0) + 1
                continue
            entries.append((f"{label}/{rel.as_posix()}", p))
    for name, path in sorted(entries, key=lambda e: e[0]):
        try:
            data = path.read_bytes()
        except OSError:
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            continue
        reason = _skip_reason(data)
        if reason is None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not utf-8"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield SourceFile(name=name, text=text)


def _long_lines(text: str) -> set[str]:
    return {s for s in (line.strip() for line in text.split("\n")) if len(s) >= _LONG_LINE}


_OWN_DISTRIBUTION = "mcmoe_vl"


def ood_documents(site: Path | None = None) -> list[SourceFile]:
    """The long description (README) of each installed distribution, in name order, deduplicated (rule 6).

    This project's own distribution is left out: its README changes with the project and would make the split
    depend on the checkout."""
    site = site or site_packages_dir()
    out, seen = [], set()
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        if meta.parent.name.split("-", 1)[0].lower() == _OWN_DISTRIBUTION:
            continue
        raw = meta.read_text(encoding="utf-8", errors="replace")
        msg = HeaderParser().parsestr(raw)
        body = (msg.get_payload() or "").strip()
        digest = hashlib.sha256(body.encode()).hexdigest()
        if len(body) < 500 or digest in seen:
            continue
        seen.add(digest)
        out.append(SourceFile(name=f"metadata/{meta.parent.name}", text=body))
    return out


def corpus_splits(roots: list[tuple[str, Path]] | None = None, *, seed: int = DEFAULT_SEED,
                  heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                  reserved_names: frozenset[str] | None = None, ood_site: Path | None = None) -> Corpus:
    """Apply rules 1-6. ``reserved_names`` defaults to ``stdlib/<name>`` of the text tasks' held-out modules."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if reserved_names is None:
        reserved_names = frozenset(f"stdlib/{d.name}" for d in stdlib_splits().heldout)
    corpus = Corpus()
    seen: set[bytes] = set()
    candidates: list[SourceFile] = []
    for f in iter_source_files(roots if roots is not None else default_roots(), corpus.skipped):
        digest = hashlib.sha256(f.text.encode()).digest()
        if digest in seen:
            corpus.skipped["duplicate"] = corpus.skipped.get("duplicate", 0) + 1
            continue
        seen.add(digest)
        if f.name in reserved_names:
            corpus.reserved.append(f)
        elif is_heldout(f.name, seed=seed, fraction=heldout_fraction):
            corpus.heldout.append(f)
        else:
            candidates.append(f)
    protected: set[str] = set()
    for f in corpus.heldout + corpus.reserved:
        protected |= _long_lines(f.text)
    cand_lines = [_long_lines(f.text) for f in candidates]
    spread: dict[str, int] = {}  # protected line -> number of candidate files holding it
    for lines in cand_lines:
        for s in lines & protected:
            spread[s] = spread.get(s, 0) + 1
    distinctive = {s for s, n in spread.items() if n <= MAX_SPREAD}  # boilerplate (licence headers) excluded
    for f, lines in zip(candidates, cand_lines):
        shared = len(lines & distinctive)
        if lines and (shared >= NEAR_COPY_LINES or shared * 4 >= len(lines) and shared >= 8):
            corpus.dropped.append(f)
        else:
            corpus.train.append(f)
    corpus.ood = ood_documents(ood_site)
    return corpus


def _digest(docs: list[SourceFile]) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for d in docs:
        b = d.text.encode()
        h.update(b)
        h.update(b"\x00")
        n += len(b)
    return h.hexdigest(), n


def _write_jsonl(path: Path, docs: list[SourceFile]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"name": d.name, "text": d.text}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def train_tokens(docs: list[SourceFile]) -> np.ndarray:
    """The training stream: each document's UTF-8 bytes followed by ``EOS_ID`` (uint16)."""
    parts = []
    eos = np.array([EOS_ID], dtype=np.uint16)
    for d in docs:
        parts.append(np.frombuffer(d.text.encode(), dtype=np.uint8).astype(np.uint16))
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def manifest_of(corpus: Corpus, *, seed: int, heldout_fraction: float) -> dict[str, Any]:
    """Sizes, document counts and sha256 (UTF-8 text, NUL-separated) of every split."""
    out: dict[str, Any] = {"version": CORPUS_VERSION, "python_version": ".".join(map(str, sys.version_info[:3])),
                           "seed": seed, "heldout_fraction": heldout_fraction, "skipped": dict(sorted(
                               corpus.skipped.items())), "splits": {}}
    for key in ("train", "heldout", "reserved", "dropped", "ood"):
        docs = getattr(corpus, key)
        sha, n = _digest(docs)
        out["splits"][key] = {"documents": len(docs), "bytes": n, "sha256": sha}
    return out


def build_corpus(out_dir: str | Path, *, seed: int = DEFAULT_SEED,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> dict[str, Any]:
    """Write the corpus files into ``out_dir`` (see the module docstring); returns the manifest. Reuses a complete
    build with the same manifest inputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_splits(seed=seed, heldout_fraction=heldout_fraction)
    manifest = manifest_of(corpus, seed=seed, heldout_fraction=heldout_fraction)
    tokens = train_tokens(corpus.train)
    tmp = out / "train.bin.tmp"
    tokens.tofile(tmp)
    tmp.replace(out / "train.bin")
    manifest["train_tokens"] = int(tokens.size)
    for key in ("heldout", "reserved", "ood"):
        _write_jsonl(out / f"{key}.jsonl", getattr(corpus, key))
    write_json_atomic(out / "manifest.json", manifest)
    logger.info("corpus: %s", json.dumps(manifest["splits"]))
    return manifest


def load_jsonl(path: str | Path) -> list[SourceFile]:
    """Documents of a split file written by :func:`build_corpus`."""
    with Path(path).open(encoding="utf-8") as fh:
        return [SourceFile(**json.loads(line)) for line in fh if line.strip()]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the source-code training corpus (python -m mcmoe_vl.data.corpus)")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    m = build_corpus(args.out_dir, seed=args.seed, heldout_fraction=args.heldout_fraction)
    print(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
