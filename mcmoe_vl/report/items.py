"""Per-item values of a report row, read from the samples files beside its results files.

A row (one model, recipe and run date) has one results file per seed; each names its samples file
(:mod:`mcmoe_vl.evaluation.samples`). :func:`row_items` gives, per task, the documents every seed has (keyed by
``(doc_id, doc_hash)``) and the values of the task's primary metric as an array (S, n) or (S, n, 2) for the
weighted perplexities. :func:`paired` aligns two rows on their common documents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcmoe_vl.evaluation.results import ResultsFile
from mcmoe_vl.evaluation.samples import read_samples

from .stats import is_ratio


@dataclass(frozen=True)
class ItemTable:
    metric: str  # "acc,none"
    docs: tuple[tuple[int, str], ...]  # (doc_id, doc_hash), sorted
    values: np.ndarray  # (S, n) or (S, n, 2)

    @property
    def n(self) -> int:
        return len(self.docs)


def _task_values(records: list[dict], metric: str) -> dict[tuple[int, str], float | list[float]]:
    name, _, filt = metric.partition(",")
    filt = filt or "none"
    out = {}
    for r in records:
        if r.get("filter", "none") == filt and name in r["values"]:
            out[(int(r["doc_id"]), str(r.get("doc_hash", "")))] = r["values"][name]
    return out


def row_items(files: list[ResultsFile], paths: list[str | os.PathLike[str]]) -> dict[str, ItemTable]:
    """Per task, the primary metric's values on the documents every seed of the row has (empty: no samples)."""
    if not files or any(f.samples is None for f in files):
        return {}
    per_seed = [read_samples(Path(p), f.samples) for f, p in zip(files, paths)]  # type: ignore[arg-type]
    out: dict[str, ItemTable] = {}
    for task, info in files[0].tasks.items():
        maps = [_task_values(s.get(task, []), info.metric) for s in per_seed]
        common = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
        if not common:
            continue
        vals = np.array([[m[d] for d in common] for m in maps], dtype=np.float64)
        if is_ratio(info.metric) != (vals.ndim == 3):
            continue  # values of another shape than the metric's aggregation: not comparable, leave it out
        out[task] = ItemTable(metric=info.metric, docs=tuple(common), values=vals)
    return out


def paired(a: ItemTable, b: ItemTable) -> tuple[np.ndarray, np.ndarray] | None:
    """Both rows' values on their common documents, in the same order (None when they share none)."""
    if a.metric != b.metric:
        return None
    common = sorted(set(a.docs) & set(b.docs))
    if not common:
        return None
    ia = {d: i for i, d in enumerate(a.docs)}
    ib = {d: i for i, d in enumerate(b.docs)}
    return a.values[:, [ia[d] for d in common]], b.values[:, [ib[d] for d in common]]
