"""Report figures: accuracy against bits with the Pareto front, and active experts per layer.

Drawn with matplotlib's object API on the Agg canvas; PNG metadata carries no date, so the same rows give the same
bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from mcmoe_vl.io import atomic_path

from .tables import Row

_MARKERS = "osD^v<>px*h"


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    return Path(path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by one with fewer (or equal) bits and a higher (or equal) score, by increasing bits."""
    front = []
    best = float("-inf")
    for bits, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((bits, score))
            best = score
    return front


def spread_labels(ys: list[float], min_gap: float, low: float, high: float) -> list[float]:
    """Label heights close to ``ys`` with at least ``min_gap`` between neighbours, kept within [low, high].

    Greedy in sorted order: push each label up past the previous one, then shift the whole stack down if it ran
    past ``high``."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [0.0] * len(ys)
    last = low - min_gap
    for i in order:
        last = max(ys[i], last + min_gap)
        placed[i] = last
    over = (last - high) if order else 0.0
    if over > 0:
        for i in order:
            placed[i] -= over
    return placed


def _model_metric(rows: list[Row]) -> tuple[str, list[tuple[float, float, float | None, str]]]:
    """The model's y-axis label and points (bits, value, standard error, recipe)."""
    from .comparisons import average_se

    cols = _columns_of(rows)
    hib = [c for c in cols if c.higher_is_better]
    if hib:
        label = f"average accuracy over {len(hib)} task(s) (%)" if all(c.percent for c in hib) else "average score"
        return label, [(r.nominal_bits, r.average, average_se(r, cols), r.recipe) for r in rows
                       if r.average is not None]
    c = cols[0]
    return f"{c.label} ({c.metric.split(',')[0]}, lower is better)", [
        (r.nominal_bits, r.scores[c.task], None, r.recipe) for r in rows if r.scores.get(c.task) is not None]


def _columns_of(rows: list[Row]):  # type: ignore[no-untyped-def]
    from .tables import task_columns

    return task_columns([f for r in rows for f in r.files], rows[0].model)


def pareto_plot(rows_by_model: dict[str, list[Row]], path: str | os.PathLike[str]) -> Path:
    """One panel per model: its own metric against nominal bits, error bars, the Pareto front, labels apart."""
    models = [m for m, rows in sorted(rows_by_model.items()) if rows]
    fig = Figure(figsize=(6.4 * max(1, len(models)), 4.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(models)), squeeze=False)[0]
    for ax, model in zip(axes, models):
        ylabel, pts = _model_metric(rows_by_model[model])
        if not pts:
            continue
        higher = "lower is better" not in ylabel
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        errs = [p[2] if p[2] is not None else 0.0 for p in pts]
        ax.errorbar(xs, ys, yerr=errs, fmt="o", markersize=4, capsize=2, zorder=3)
        front = pareto_front([(b, v if higher else -v) for b, v in zip(xs, ys)])
        ax.plot([p[0] for p in front], [p[1] if higher else -p[1] for p in front], linewidth=1, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(xs) / 1.15, max(xs) * 2.4)  # room on the right for the labels
        ticks = [t for t in (1, 1.5, 2, 2.5, 3, 4, 8, 16, 32) if min(xs) / 1.15 <= t <= max(xs) * 2.4]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        lo, hi = min(y - e for y, e in zip(ys, errs)), max(y + e for y, e in zip(ys, errs))
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
        gap = (hi - lo + 2 * pad) / 22  # about one 7-pt text line on a 4.6-inch axis
        label_y = spread_labels(ys, gap, lo - pad + gap / 2, hi + pad - gap / 2)
        for (b, v, _, name), ly in zip(pts, label_y):
            ax.annotate(name, (b, v), xytext=(b * 1.25, ly), fontsize=7, va="center",
                        arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "grey"})
        ax.set_xlabel("nominal bits (log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{model} (line: Pareto front)", fontsize=10)
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def active_experts_plot(rows: list[Row], model: str, path: str | os.PathLike[str]) -> Path | None:
    """Average active experts per token in each MoE layer, one line per recipe given (the report passes the pruned
    ones), against the top-k line; integer layer ticks."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    top_k = None
    for i, r in enumerate(rows):
        act = r.files[0].compression.active_experts
        if not act:
            continue
        top_k = act[0].top_k
        xs = [a.index for a in act]
        # mean over seeds, layer by layer
        ys = [sum(f.compression.active_experts[j].avg_active_experts for f in r.files) / len(r.files)
              for j in range(len(act))]
        ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], markersize=3, linewidth=1, label=r.recipe)
        drawn += 1
    if not drawn:
        return None
    if top_k is not None:
        ax.axhline(top_k, color="grey", linewidth=0.8, linestyle=":", label=f"top-k = {top_k}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("active experts per token")
    ax.set_title(f"{model}: active experts per layer (dotted: top-k)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncols=2, loc="center right")
    return _save(fig, path)
