"""Report figures: accuracy against bits with the Pareto front, and active experts per layer.

Drawn with matplotlib's object API on the Agg canvas; PNG metadata carries no date, so the same rows give the same
bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def pareto_plot(rows_by_model: dict[str, list[Row]], path: str | os.PathLike[str]) -> Path:
    """Average accuracy (%) against nominal bits, one series per model, the Pareto front of each as a line."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for mi, (model, rows) in enumerate(sorted(rows_by_model.items())):
        pts = [(r.nominal_bits, r.average, r.recipe) for r in rows if r.average is not None]
        if not pts:
            continue
        marker = _MARKERS[mi % len(_MARKERS)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=model, zorder=3)
        for b, s, name in pts:
            ax.annotate(name, (b, s), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(b, s) for b, s, _ in pts])
        ax.plot([p[0] for p in front], [p[1] for p in front], linewidth=1, alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nominal bits (log scale)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Accuracy against bits (lines: Pareto fronts)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def active_experts_plot(rows: list[Row], model: str, path: str | os.PathLike[str]) -> Path | None:
    """Average active experts per token in each MoE layer, one line per recipe (measured, from the results)."""
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
        ax.axhline(top_k, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("active experts per token")
    ax.set_title(f"{model}: active experts per layer (dotted: top-k)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncols=2)
    return _save(fig, path)
