"""Allocate from a statistics file and save the plan (what ``mcmoe-vl allocate`` runs)."""

from __future__ import annotations

import os
from pathlib import Path

from mcmoe_vl.calibration.stats import load_stats
from mcmoe_vl.io import check_output_outside

from .allocate import allocate
from .config import AllocationConfig
from .plan import BitPlan


def allocate_files(
    stats_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: AllocationConfig,
    *,
    heatmap: str | os.PathLike[str] | None = None,
) -> BitPlan:
    """Read the statistics, allocate, write the plan JSON (atomically) and optionally its heatmap (Fig. 9)."""
    for out in (output, heatmap):
        if out is not None:
            check_output_outside(out, {"statistics file": stats_path})
    stats = load_stats(stats_path)
    plan = allocate(stats, config)
    plan.save(output)
    if heatmap is not None:
        from mcmoe_vl.plots import allocation_heatmap

        allocation_heatmap(
            [lp.bits for lp in plan.layers], heatmap, layer_labels=[str(lp.index) for lp in plan.layers],
            title=f"{plan.allocator} bit allocation, {Path(str(stats_path)).stem}",
        )
    return plan
