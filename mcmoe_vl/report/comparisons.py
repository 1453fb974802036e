"""Uncertainty of each table cell and the paired comparisons table, computed from per-item outputs.

Each compressed row is compared with the model's reference row (16-bit unless the suite names another) and with its
paired baseline (:func:`paired_baseline`): the same quantization without pruning for a pruned recipe, else the
uniform recipe at the same bits. A ``pmq+`` row is also compared with the paper's PMQ at the same bits
(:func:`paper_pmq_row`), the fidelity reference it improves on. Differences are paired bootstraps over the documents both rows were evaluated on
(:func:`mcmoe_vl.report.stats.paired_difference`), with the seed spread of both rows; a difference whose interval
excludes 0 is marked ▲ (better) or ▼ (worse).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import stats
from .items import paired
from .tables import Row, TaskColumn, display, fmt_num, reference_row


@dataclass(frozen=True)
class Settings:
    confidence: float = 0.95
    iters: int = 2000

    @property
    def pct(self) -> str:
        return f"{100 * self.confidence:g}%"


def cell(row: Row, col: TaskColumn, s: Settings) -> str:
    """The score with its standard error (accuracy-like) or its bootstrap interval (perplexity)."""
    value = fmt_num(display(row.scores[col.task], col))
    it = row.items.get(col.task)
    if it is None or row.scores[col.task] is None:
        return value
    if stats.is_perplexity(col.metric):
        lo, hi = stats.bootstrap_interval(col.metric, it.values, confidence=s.confidence, iters=s.iters,
                                          rng=stats.rng_for("interval", row.model, row.recipe, row.run, col.task))
        return f"{value} [{fmt_num(lo)}, {fmt_num(hi)}]"
    scale = 100.0 if col.percent else 1.0
    return f"{value} ± {fmt_num(scale * stats.standard_error(it.values))}"


def average_se(row: Row, columns: list[TaskColumn]) -> float | None:
    """Standard error of the average over higher-is-better tasks (tasks have independent items)."""
    ses = []
    for c in columns:
        if not c.higher_is_better:
            continue
        it = row.items.get(c.task)
        if it is None or stats.is_perplexity(c.metric):
            return None
        ses.append((100.0 if c.percent else 1.0) * stats.standard_error(it.values))
    return (sum(x * x for x in ses) ** 0.5) / len(ses) if ses else None


def _quant_key(row: Row) -> tuple | None:
    q = row.files[0].compression.quant
    if not q:
        return None
    return (q.allocator, q.target_bits, q.budget, tuple(q.bit_set), q.scope, q.group_size)


def paired_baseline(rows: list[Row], row: Row, compare_to: str | None) -> Row | None:
    """The row ``row`` is compared with besides the reference (see the module docstring); None where none fits."""
    same_run = [r for r in rows if r.run == row.run and r is not row and not r.baseline]
    if compare_to is not None:
        return next((r for r in same_run if r.recipe == compare_to), None)
    key = _quant_key(row)
    if row.files[0].compression.prune:
        return next((r for r in same_run if not r.files[0].compression.prune and _quant_key(r) == key), None)
    if key is None or key[0] == "uniform":
        return None
    return next((r for r in same_run if (q := _quant_key(r)) is not None and q[0] == "uniform"
                 and q[1] == key[1] and q[2] == key[2] and not r.files[0].compression.prune), None)


def paper_pmq_row(rows: list[Row], row: Row) -> Row | None:
    """For an unpruned ``pmq+`` row: the unpruned paper-PMQ row of the same run at the same target bits and widths."""
    key = _quant_key(row)
    if key is None or key[0] != "pmq+" or row.files[0].compression.prune:
        return None
    return next((r for r in rows if r.run == row.run and r is not row and not r.files[0].compression.prune
                 and (q := _quant_key(r)) is not None and q[0] == "pmq" and q[1:4] == key[1:4]), None)


def _fmt_diff(d: stats.Difference, higher_is_better: bool) -> str:
    unit = "%" if d.relative else ""
    text = f"{d.estimate:+.2f}{unit} [{d.low:+.2f}, {d.high:+.2f}]"
    if not d.significant:
        return text
    better = (d.estimate > 0) == higher_is_better
    return f"**{text}** {'▲' if better else '▼'}"


def compare(a: Row, b: Row, columns: list[TaskColumn], s: Settings) -> tuple[list[str], stats.Difference | None]:
    """Cells of one comparison (each task's paired difference, then the average's) and the average's difference."""
    out = []
    avg_parts = []
    for c in columns:
        ia, ib = a.items.get(c.task), b.items.get(c.task)
        pair = paired(ia, ib) if ia is not None and ib is not None else None
        if pair is None:
            out.append("-")
            continue
        d = stats.paired_difference(c.metric, *pair, confidence=s.confidence, iters=s.iters,
                                    rng=stats.rng_for("paired", a.model, a.recipe, a.run, b.recipe, b.run, c.task))
        if not d.relative and c.percent:
            d = stats.Difference(100 * d.estimate, 100 * d.low, 100 * d.high, d.n, False)
        out.append(_fmt_diff(d, c.higher_is_better))
        if c.higher_is_better and not stats.is_perplexity(c.metric):
            avg_parts.append((c.metric, *pair))
    n_hib = sum(c.higher_is_better for c in columns)
    if avg_parts and len(avg_parts) == n_hib:
        d = stats.paired_average_difference(avg_parts, confidence=s.confidence, iters=s.iters,
                                            rng=stats.rng_for("paired-avg", a.model, a.recipe, a.run, b.recipe, b.run),
                                            scale=100.0 if all(c.percent for c in columns if c.higher_is_better)
                                            else 1.0)
        out.append(_fmt_diff(d, True))
        return out, d
    out.append("-")
    return out, None


def paired_table(rows: list[Row], columns: list[TaskColumn], reference: str | None, compare_to: str | None,
                 s: Settings) -> list[str]:
    """The paired-differences table of one model (empty when no row has per-item outputs)."""
    if not any(r.items for r in rows):
        return []
    head = ["Recipe", "against"] + [c.label for c in columns] + ["Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    verdicts: dict[str, list[str]] = {"better": [], "worse": [], "noise": []}
    for r in rows:
        if r.baseline and reference is None:
            continue
        ref = reference_row(rows, r, reference)
        targets = [ref] if ref is not None and ref is not r else []
        for pb in (paired_baseline(rows, r, compare_to), paper_pmq_row(rows, r)):
            if pb is not None and pb not in targets:
                targets.append(pb)
        for t in targets:
            cells, avg = compare(r, t, columns, s)
            lines.append("| " + " | ".join([r.recipe, t.recipe] + cells) + " |")
            if avg is not None:
                kind = "noise" if not avg.significant else ("better" if avg.estimate > 0 else "worse")
                verdicts[kind].append(f"{r.recipe} vs {t.recipe} ({avg.estimate:+.2f} [{avg.low:+.2f}, "
                                      f"{avg.high:+.2f}])")
    if len(lines) <= 2:
        return []
    summary = [f"- {label} on the average at {s.pct}: " + ("; ".join(v) if v else "none")
               for label, v in (("Significantly better", verdicts["better"]),
                                ("Significantly worse", verdicts["worse"]),
                                ("Within noise", verdicts["noise"]))
               if any(verdicts.values())]
    return lines + ([""] + summary if summary else [])


def seed_spread_table(rows: list[Row], columns: list[TaskColumn]) -> list[str]:
    """Per row with several seeds: the standard deviation over seeds of each task's score (display units)."""
    multi = [r for r in rows if len(r.seeds) > 1]
    if not multi:
        return []
    lines = ["| Recipe | seeds | " + " | ".join(c.label for c in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for r in multi:
        cells = []
        for c in columns:
            sd = r.spread.get(c.task)
            cells.append("-" if sd is None else fmt_num(sd * (100.0 if c.percent else 1.0)))
        lines.append(f"| {r.recipe} | {len(r.seeds)} | " + " | ".join(cells) + " |")
    return lines
