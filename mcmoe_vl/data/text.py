"""Offline text corpora: Python standard-library docstrings (in-domain) and docstring-free source (out-of-domain).

Every fresh machine with Python has the standard library's source, so the embedded language model trains on the
human-written documentation strings in it. The recipe:

1. Walk the stdlib directory (``sysconfig.get_paths()["stdlib"]``) for ``*.py`` files in sorted relative-path order,
   skipping test suites, ``site-packages`` and files that do not parse.
2. One *document* per module: its module, class and function docstrings (``ast.get_docstring``, cleaned), in
   source order, joined by blank lines.
3. Split by document: a module is held out when ``sha256(f"{seed}:{relpath}")`` falls below ``heldout_fraction``
   of the hash range. The decision depends on the module's path only, so it is stable when other modules are
   added or removed between Python versions.
4. Out-of-domain: the held-out modules' source with every docstring removed (``ast.unparse``), held out only
   (the model never trains on code).

:func:`corpus_digest` hashes the produced splits; the training log records it together with the Python version.
Because the stdlib differs a little between Python releases, evaluation reads fixed samples shipped under
``tasks/lm_eval/data/`` (see :func:`mcmoe_vl.data.samples`), not a regenerated corpus.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_SEED = 0
DEFAULT_HELDOUT_FRACTION = 0.1
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "lib2to3", "turtledemo"})


@dataclass(frozen=True)
class Document:
    """One module of the standard library: its path, docstring text and docstring-free source."""

    name: str  # relative path, e.g. "json/decoder.py"
    docstrings: str
    code: str


@dataclass(frozen=True)
class TextSplits:
    """Train / held-out docstring documents and held-out out-of-domain code documents."""

    train: tuple[Document, ...]
    heldout: tuple[Document, ...]
    python_version: str
    seed: int
    heldout_fraction: float

    def train_text(self) -> str:
        """All training docstring documents joined by blank lines."""
        return "\n\n".join(d.docstrings for d in self.train)

    def heldout_text(self) -> str:
        """All held-out docstring documents joined by blank lines."""
        return "\n\n".join(d.docstrings for d in self.heldout)

    def ood_text(self) -> str:
        """The held-out modules' source code with docstrings stripped."""
        return "\n\n".join(d.code for d in self.heldout if d.code)


def stdlib_dir() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _docstring_nodes(tree: ast.Module) -> list[ast.AST]:
    """Module, class and function nodes in source order (pre-order walk)."""
    out: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _strip_docstrings(tree: ast.Module) -> str:
    """Source without docstrings (bodies left empty get ``pass``); comments are gone too (``ast.unparse``)."""
    for node in _docstring_nodes(tree):
        body = node.body  # type: ignore[attr-defined]
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body.pop(0)
            if not body:
                body.append(ast.Pass())
    return ast.unparse(tree)


def parse_module(source: str, name: str) -> Document | None:
    """The :class:`Document` of one module's source, or None when it does not parse or has no docstring."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    docs = []
    for node in _docstring_nodes(tree):
        d = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if d and d.strip():
            docs.append(d.strip())
    if not docs:
        return None
    return Document(name=name, docstrings="\n\n".join(docs), code=_strip_docstrings(tree))


def is_heldout(name: str, *, seed: int = DEFAULT_SEED, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Whether the module at relative path ``name`` is held out: its seeded sha256 falls below ``fraction``."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")
    return h < fraction * 2**64


def iter_stdlib_modules(root: Path | None = None) -> list[Path]:
    """The stdlib ``*.py`` files in sorted relative-path order, skipping test suites and third-party packages."""
    root = root or stdlib_dir()
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("test_") for part in rel.parts):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=4)
def stdlib_splits(seed: int = DEFAULT_SEED, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> TextSplits:
    """Train / held-out docstring splits of this interpreter's standard library (deterministic, seeded)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    root = stdlib_dir()
    train, heldout = [], []
    for p in iter_stdlib_modules(root):
        name = p.relative_to(root).as_posix()
        try:
            source = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        doc = parse_module(source, name)
        if doc is None:
            continue
        (heldout if is_heldout(name, seed=seed, fraction=heldout_fraction) else train).append(doc)
    if not train or not heldout:
        raise RuntimeError(f"no standard-library docstrings found under {root}")
    logger.info("stdlib corpus: %d train / %d held-out modules", len(train), len(heldout))
    return TextSplits(train=tuple(train), heldout=tuple(heldout),
                      python_version=".".join(map(str, sys.version_info[:3])), seed=seed,
                      heldout_fraction=heldout_fraction)


def corpus_digest(splits: TextSplits) -> dict[str, str | int]:
    """sha256 of each produced split (UTF-8 bytes) and its size, for the training log."""
    out: dict[str, str | int] = {"python_version": splits.python_version, "seed": splits.seed}
    for key, text in (("train", splits.train_text()), ("heldout", splits.heldout_text()),
                      ("ood", splits.ood_text())):
        b = text.encode("utf-8")
        out[f"{key}_sha256"] = hashlib.sha256(b).hexdigest()
        out[f"{key}_bytes"] = len(b)
    out["train_modules"] = len(splits.train)
    out["heldout_modules"] = len(splits.heldout)
    return out
