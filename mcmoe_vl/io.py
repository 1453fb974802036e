"""Atomic artifact writes and small JSON helpers.

Every artifact a later stage trusts (statistics, plans, checkpoints, results, reports) is written to a temporary
file in the destination directory and renamed into place, so an interrupted run never leaves a half-written file
under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file 0600; artifacts get the permissions of an ordinary new file (0666 less the umask).
    # Set after the writer ran: some writers (safetensors) replace the file rather than write into it.
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (sorted keys, so two artifacts diff cleanly) atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")


def save_safetensors_atomic(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through a temporary file (tensors are made contiguous)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def read_json(path: str | os.PathLike[str], *, what: str = "file") -> Any:
    """Read JSON with an error that names the file and what it was supposed to be."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {p} is not valid JSON ({exc}); it may be truncated: delete it and re-run") from exc


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(path: str | os.PathLike[str], *, hash_limit: int = 64 << 20,
                           exclude: tuple[str | os.PathLike[str], ...] = ()) -> dict[str, Any]:
    """Identify a local checkpoint directory: config and small files by content (SHA-256), files larger than
    ``hash_limit`` by size and mtime. ``exclude``: files to leave out (e.g. an output being written inside it)."""
    path = Path(path)
    skip = {Path(p).resolve() for p in exclude}
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.resolve() in skip:
            continue
        st = f.stat()
        rel = f.relative_to(path).as_posix()
        files[rel] = file_sha256(f) if st.st_size <= hash_limit else f"size={st.st_size},mtime={st.st_mtime_ns}"
    return {"path": str(path), "files": files}


def is_within(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (symlinks resolved)."""
    p, d = Path(path).resolve(), Path(directory).resolve()
    return p == d or d in p.parents


def check_output_outside(output: str | os.PathLike[str], inputs: Mapping[str, str | os.PathLike[str]], *,
                         what: str = "output") -> None:
    """Refuse an output that is an input file, an input directory or lies inside one (``inputs``: label -> path),
    before any work: writing there would replace or alter what a later run reads (quantizing into the model's own
    directory overwrites its weights; ``--output`` naming the data file overwrites the data). The error names both
    paths."""
    for label, d in inputs.items():
        if Path(d).is_dir() and is_within(output, d):
            raise ValueError(f"{what} {output} is inside the {label} {d} (an input of this run); choose an {what} "
                             f"outside it")
        if Path(d).is_file() and Path(output).resolve() == Path(d).resolve():
            raise ValueError(f"{what} {output} is the {label} (an input of this run); choose another {what}")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "value"):  # enums
        return o.value
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def slug(name: str) -> str:
    """A file-system name for a model or recipe name ("PMQ 2.0 + ODP" -> "pmq-2.0-odp"; a "+" that ends a word is
    "plus": "pmq+ 2.0" -> "pmqplus-2.0")."""
    s = re.sub(r"(?<=[a-z0-9])\+", "plus", name.lower())
    s = re.sub(r"[^a-z0-9.]+", "-", s).strip("-")
    return s or "x"
