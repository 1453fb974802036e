"""Figures for reports: expert-significance and bit-allocation heatmaps (PNG, matplotlib Agg canvas)."""

from .heatmaps import allocation_heatmap, significance_heatmaps

__all__ = ["allocation_heatmap", "significance_heatmaps"]
