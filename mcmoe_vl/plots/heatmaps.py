"""Heatmaps of expert significance (MC-MoE Fig. 3) and of bit allocations (Fig. 9), as PNG files.

Rows are MoE layers, columns experts. Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot,
no display, no global backend switch), so they can be made from worker threads and headless machines.

::

    significance_heatmaps(stats, "runs/significance.png")              # phi, w, eps (Fig. 3)
    significance_heatmaps(stats, "runs/significance_image.png", group="image")
    allocation_heatmap(widths, "runs/bits.png", layer_labels=[...])    # Fig. 9
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from mcmoe_vl.calibration.stats import CalibrationStats, TokenGroupStats
from mcmoe_vl.io import atomic_path


def _ragged(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """(layers, max experts) with NaN where a layer has fewer experts."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _size(n_layers: int, n_experts: int, panels: int) -> tuple[float, float]:
    cell = 0.32 if n_experts <= 16 else 0.12
    w = min(max(3.0, n_experts * cell + 1.2), 14.0)
    h = min(max(2.5, n_layers * 0.22 + 1.0), 10.0)
    return w * panels, h


def _panel(fig: Figure, ax, data: np.ndarray, title: str, cmap: str, labels: list[str]) -> None:
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, len(labels) // 16)
    ax.set_yticks(range(0, len(labels), step))
    ax.set_yticklabels(labels[::step], fontsize=7)
    n = data.shape[1]
    xstep = max(1, n // 16)
    ax.set_xticks(range(0, n, xstep))
    ax.tick_params(axis="x", labelsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)


def significance_heatmaps(
    stats: CalibrationStats,
    path: str | os.PathLike[str],
    *,
    group: str = "all",
    eps_bits: int | None = None,
    dpi: int = 120,
) -> Path:
    """Three panels, layers x experts: access frequency phi (blue), activation weight w (green), eps (red).

    ``group``: ``all``, ``image`` or ``text`` tokens (the latter two need a VLM calibration with image masks).
    ``eps_bits``: the width whose eps is shown (default: the lowest in the table). phi and w are per-layer shares
    (normalised to sum to 1 in the layer), as the allocator sees them.
    """
    if not stats.layers:
        raise ValueError("the statistics have no finished MoE layers to plot")
    groups: list[TokenGroupStats] = []
    for la in stats.layers:
        g = getattr(la, group, None) if group in ("all", "image", "text") else None
        if g is None:
            raise ValueError(f"layer {la.index} has no {group!r} statistics; valid groups: all"
                             + (", image, text" if la.image is not None else ""))
        groups.append(g)
    labels = [str(la.index) for la in stats.layers]

    def share(v: Sequence[float]) -> list[float]:
        s = float(sum(v))
        return [x / s if s > 0 else 0.0 for x in v]

    panels = [
        (_ragged([share(g.counts) for g in groups]), f"access frequency phi ({group})", "Blues"),
        (_ragged([share(g.weight_sum) for g in groups]), f"activation weight w ({group})", "Greens"),
    ]
    available = sorted({int(k) for la in stats.layers for k in la.eps})
    if available:
        b = eps_bits if eps_bits is not None else available[0]
        if any(str(b) not in la.eps for la in stats.layers):
            raise ValueError(f"no eps at {b} bits in every layer; available widths: {available}")
        panels.append((_ragged([la.eps[str(b)] for la in stats.layers]), f"quantization error eps ({b}-bit)",
                       "Reds"))
    fig = Figure(figsize=_size(len(labels), panels[0][0].shape[1], len(panels)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (data, title, cmap) in zip(axes, panels):
        _panel(fig, ax, data, title, cmap, labels)
    fig.suptitle(f"Expert significance: {stats.model_name or stats.model_type}, {stats.num_tokens} tokens",
                 fontsize=11)
    return _save(fig, path, dpi)


def allocation_heatmap(
    widths: Sequence[Sequence[int]],
    path: str | os.PathLike[str],
    *,
    layer_labels: Sequence[str] | None = None,
    title: str = "Expert bit allocation",
    dpi: int = 120,
) -> Path:
    """Layers x experts coloured by bit width (one discrete colour per width), numbers in the cells when small."""
    data = _ragged([[float(w) for w in row] for row in widths])
    if data.size == 0:
        raise ValueError("nothing to plot: no layers or experts")
    present = sorted({int(w) for row in widths for w in row})
    palette = ["#d73027", "#fc8d59", "#fee090", "#91bfdb", "#4575b4", "#313695", "#1a1a40", "#000000"]
    cmap = ListedColormap([palette[min(w, len(palette)) - 1] for w in present])
    bounds = [present[0] - 0.5] + [(a + b) / 2 for a, b in zip(present, present[1:])] + [present[-1] + 0.5]
    norm = BoundaryNorm(bounds, cmap.N)
    labels = list(layer_labels) if layer_labels is not None else [str(i) for i in range(len(widths))]
    fig = Figure(figsize=_size(data.shape[0], data.shape[1], 1), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    if data.shape[1] <= 16 and data.shape[0] <= 40:
        for (r, c), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=7,
                        color="white" if v <= present[0] or v >= 4 else "black")
    means = [float(np.mean(row)) for row in widths]
    ax.set_title(f"{title} (mean {float(np.mean(np.concatenate([np.asarray(r, float) for r in widths]))):.3f} bits)",
                 fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, len(labels) // 20)
    ax.set_yticks(range(0, len(labels), step))
    ax.set_yticklabels([f"{labels[i]} ({means[i]:.2f})" for i in range(0, len(labels), step)], fontsize=7)
    ax.set_xticks(range(0, data.shape[1], max(1, data.shape[1] // 16)))
    ax.tick_params(axis="x", labelsize=7)
    cb = fig.colorbar(im, ax=ax, ticks=present, fraction=0.046, pad=0.03)
    cb.set_label("bits")
    return _save(fig, path, dpi)
