"""Rows of the paper-style table (MC-MoE Tables 2 and 4), computed from results files only.

A row is one (model, recipe, run date) with its seeds averaged. Columns: the primary metric of each task (accuracy
in percent, perplexity as is), the average over higher-is-better tasks, the change of that average against the
model's baseline row, nominal and effective bits, size, activated parameters per token and the measured speed-up
against the baseline row.

Order is deterministic and independent of the order files are given in: models by name; within a model the
baseline first, then by decreasing nominal bits, then recipe name, then run date.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from mcmoe_vl.evaluation.results import ResultsFile


class ReportError(ValueError):
    """Results that cannot be put in one report (the message says which files and why)."""


@dataclass
class TaskColumn:
    task: str
    label: str
    metric: str
    harness: str
    higher_is_better: bool
    percent: bool  # accuracy-like metrics in [0, 1] are shown x100


@dataclass
class Row:
    model: str
    recipe: str
    run: str  # run date (YYYY-MM-DD)
    baseline: bool
    seeds: list[int]
    scores: dict[str, float | None]  # task -> mean over seeds of the primary metric (as stored, not x100)
    spread: dict[str, float | None]  # task -> sample standard deviation over seeds (None with one seed)
    nominal_bits: float
    effective_bits: float | None
    size_bytes: int | None
    activated_params: float | None
    activated_reduction: float | None
    tokens_per_second: float | None
    measured_speedup: float | None = None  # against the original model timed in alternation (same minutes)
    files: list[ResultsFile] = field(default_factory=list)
    items: dict[str, Any] = field(default_factory=dict)  # task -> ItemTable (per-item values, .items)
    average: float | None = None  # over higher-is-better tasks, in display units
    delta: float | None = None
    speedup: float | None = None


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if len(vals) == len(xs) and vals else None


def _std(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.stdev(vals) if len(vals) == len(xs) and len(vals) > 1 else None


def task_columns(files: list[ResultsFile], model: str) -> list[TaskColumn]:
    """The model's tasks, ordered by harness then label; metric and direction must agree across files."""
    cols: dict[str, TaskColumn] = {}
    for f in files:
        if f.model != model:
            continue
        for task, info in f.tasks.items():
            metric_name = info.metric.split(",", 1)[0]
            hib = f.higher_is_better.get(task, {}).get(metric_name)
            if hib is None:
                hib = "perplexity" not in metric_name and "bits_per_byte" not in metric_name
            col = TaskColumn(task=task, label=info.label, metric=info.metric, harness=info.harness,
                             higher_is_better=bool(hib), percent=bool(hib) and metric_name != "f1_raw")
            old = cols.get(task)
            if old is None:
                cols[task] = col
            elif (old.metric, old.higher_is_better) != (col.metric, col.higher_is_better):
                raise ReportError(f"model {model!r}, task {task!r}: results files disagree on the metric "
                                  f"({old.metric} vs {col.metric}); report them separately")
    return sorted(cols.values(), key=lambda c: (c.harness, c.label, c.task))


def build_rows(files: list[ResultsFile], model: str, columns: list[TaskColumn]) -> list[Row]:
    groups: dict[tuple[str, str], list[ResultsFile]] = {}
    for f in files:
        if f.model == model:
            groups.setdefault((f.recipe, f.date[:10]), []).append(f)
    rows = []
    for (recipe, run), fs in groups.items():
        seeds = [f.seed for f in fs]
        if len(set(seeds)) != len(seeds):
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            raise ReportError(f"model {model!r}, recipe {recipe!r}, run {run}: seed(s) {dup} appear in more than one "
                              f"results file; pass each result once")
        fs = sorted(fs, key=lambda f: f.seed)
        comp = [f.compression for f in fs]
        scores: dict[str, float | None] = {}
        spread: dict[str, float | None] = {}
        for c in columns:
            per_seed = [f.score(c.task) if c.task in f.tasks else None for f in fs]
            scores[c.task] = _mean(per_seed)
            spread[c.task] = _std(per_seed)
        tps = [x.speed.tokens_per_second for x in comp if x.speed is not None]
        own = [x.speed.speedup for x in comp if x.speed is not None and x.speed.speedup is not None]
        rows.append(Row(
            model=model, recipe=recipe, run=run, baseline=all(x.baseline for x in comp), seeds=[f.seed for f in fs],
            scores=scores, spread=spread,
            nominal_bits=statistics.fmean(x.nominal_bits for x in comp),
            effective_bits=_mean([x.effective_bits for x in comp]),
            size_bytes=comp[0].size_bytes,
            activated_params=_mean([x.activated_params_per_token for x in comp]),
            activated_reduction=_mean([x.activated_params_reduction for x in comp]),
            tokens_per_second=statistics.fmean(tps) if tps else None,
            measured_speedup=statistics.fmean(own) if own and len(own) == len(comp) else None,
            files=fs,
        ))
    for r in rows:
        acc = [display(r.scores[c.task], c) for c in columns if c.higher_is_better]
        r.average = statistics.fmean(acc) if acc and all(a is not None for a in acc) else None  # type: ignore[arg-type]
    rows.sort(key=lambda r: (not r.baseline, -r.nominal_bits, r.recipe, r.run))
    for r in rows:
        base = reference_row(rows, r)
        if base is not None:
            if r.average is not None and base.average is not None:
                r.delta = r.average - base.average
            if r.tokens_per_second and base.tokens_per_second:
                r.speedup = r.tokens_per_second / base.tokens_per_second
        if r.measured_speedup is not None:
            r.speedup = r.measured_speedup
    return rows


def reference_row(rows: list[Row], row: Row, baseline: str | None = None) -> Row | None:
    """The baseline row of the same model: same run date if there is one, else the latest."""
    cands = [r for r in rows if (r.recipe == baseline if baseline else r.baseline)]
    if not cands:
        return None
    same = [r for r in cands if r.run == row.run]
    return (same or sorted(cands, key=lambda r: r.run))[-1]


def task_n(files: list[ResultsFile], rows: list[Row], col: TaskColumn) -> int | None:
    """Documents of a task: from the per-item outputs, else the harness's ``n-samples`` (the most any row has)."""
    ns = [r.items[col.task].n for r in rows if col.task in r.items]
    if not ns:
        for f in files:
            eff = (f.n_samples.get(col.task) or {}).get("effective")
            if isinstance(eff, int):
                ns.append(eff)
    return max(ns) if ns else None


def display(v: float | None, col: TaskColumn) -> float | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return 100.0 * v if col.percent else v


def fmt_num(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e6:
        return f"{v:.{digits}e}"
    return f"{v:.{digits}f}"


def fmt_signed(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:+.{digits}f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def fmt_params(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"
