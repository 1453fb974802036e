"""Per-item outputs of an evaluation (the harnesses' ``log_samples``), kept beside each results file.

Every number of the report's uncertainty and paired comparisons is computed from these files, never re-evaluated.
One JSON line per (task, document, filter)::

    {"task": "mcmoe_docstring_cloze", "doc_id": 17, "doc_hash": "9f1c...", "filter": "none",
     "values": {"acc": 1.0, "acc_norm": 0.0}, "response": "..."}

``values`` holds each metric of the task exactly as the harness logged it for that document: a number for
mean-aggregated metrics (acc, exact_match), a ``[loglikelihood, count]`` pair for the weighted perplexities
(word / byte perplexity, bits per byte). ``doc_hash`` is the harness's hash of the document, so two recipes are
paired only on documents that are really the same. ``response`` (generation tasks only) is the filtered answer,
cut to 200 characters, for reading.

The results file names its samples file and its SHA-256 (:class:`SamplesRef`); a report refuses a samples file whose
digest does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from mcmoe_vl.io import write_text_atomic

SAMPLES_SUFFIX = ".samples.jsonl"
_RESPONSE_CHARS = 200


class SamplesError(ValueError):
    """A samples file that is missing, altered since its results file was written, or malformed."""


class SamplesRef(BaseModel):
    """Where a results file's per-item outputs are (relative to the results file) and what they hash to."""

    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str
    items: dict[str, int]  # task -> documents (of the task's primary filter)


def _number(v: Any) -> float | list[float] | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return float(v.item())
    if isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return [float(v[0]), float(v[1])]
    return None


def compact_samples(samples: Iterable[dict[str, Any]], metrics: Iterable[str], task: str) -> list[dict[str, Any]]:
    """The per-item records of one task (see the module docstring) from the harness's logged samples."""
    names = sorted(set(metrics))
    out = []
    for s in samples:
        values = {m: v for m in names if m in s and (v := _number(s[m])) is not None}
        if not values:
            continue
        rec: dict[str, Any] = {"task": task, "doc_id": int(s["doc_id"]), "doc_hash": str(s.get("doc_hash", "")),
                               "filter": str(s.get("filter", "none")), "values": values}
        resp = s.get("filtered_resps")
        if isinstance(resp, list) and resp and isinstance(resp[0], str):
            rec["response"] = resp[0][:_RESPONSE_CHARS]
        out.append(rec)
    return sorted(out, key=lambda r: (r["filter"], r["doc_id"]))


def write_samples(path: str | os.PathLike[str], samples: dict[str, list[dict[str, Any]]]) -> SamplesRef:
    """Write every task's records (tasks sorted, documents sorted) atomically; return the reference to store."""
    lines = [json.dumps(rec, sort_keys=True) for task in sorted(samples) for rec in samples[task]]
    text = "\n".join(lines) + ("\n" if lines else "")
    write_text_atomic(path, text)
    items = {task: len({r["doc_id"] for r in recs}) for task, recs in sorted(samples.items())}
    return SamplesRef(file=Path(path).name, sha256=hashlib.sha256(text.encode()).hexdigest(), items=items)


def read_samples(results_path: str | os.PathLike[str], ref: SamplesRef) -> dict[str, list[dict[str, Any]]]:
    """The records of a results file's samples file by task; checks the digest the results file recorded."""
    path = Path(results_path).parent / ref.file
    if not path.is_file():
        raise SamplesError(f"{results_path}: its per-item outputs {path} are missing; re-run the evaluation "
                           f"(`mcmoe-vl run`) or pass the results directory with its .samples.jsonl files")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise SamplesError(f"{path}: SHA-256 differs from the one recorded in {results_path}; the file was changed "
                           f"after the evaluation")
    out: dict[str, list[dict[str, Any]]] = {}
    for i, line in enumerate(data.decode().splitlines(), 1):
        try:
            rec = json.loads(line)
            out.setdefault(rec["task"], []).append(rec)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SamplesError(f"{path}:{i}: not a samples record ({exc})") from None
    return out


def samples_path_for(results_path: str | os.PathLike[str]) -> Path:
    """``.../<name>.json`` -> ``.../<name>.samples.jsonl``."""
    p = Path(results_path)
    return p.with_name(p.stem + SAMPLES_SUFFIX)
