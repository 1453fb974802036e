"""The heatmaps are written as non-empty PNG files and refuse what they cannot draw."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_calibration import make_batches
from tiny_models import tiny_mixtral

from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.plots import allocation_heatmap, significance_heatmaps


@pytest.fixture(scope="module")
def stats():
    return calibrate(tiny_mixtral(seed=3, layers=3), make_batches(seed=1, image=True),
                     CalibrationConfig(eps_bits=(1, 2), group_size=16), progress=False)


def _is_png_with_content(path):
    img = Image.open(path)
    assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 100
    px = np.asarray(img.convert("L"))
    assert px.std() > 10  # not a blank canvas


@pytest.mark.parametrize("group", ["all", "image", "text"])
def test_significance_heatmaps_written(stats, tmp_path, group):
    out = significance_heatmaps(stats, tmp_path / f"sig_{group}.png", group=group, eps_bits=2)
    _is_png_with_content(out)


def test_allocation_heatmap_written(tmp_path):
    rng = np.random.default_rng(0)
    _is_png_with_content(allocation_heatmap([rng.integers(1, 4, 8) for _ in range(4)], tmp_path / "a.png"))
    _is_png_with_content(allocation_heatmap([rng.integers(1, 5, 72) for _ in range(30)], tmp_path / "b.png"))


def test_plot_errors(stats, tmp_path):
    with pytest.raises(ValueError, match="no eps at 3 bits"):
        significance_heatmaps(stats, tmp_path / "x.png", eps_bits=3)
    with pytest.raises(ValueError, match="no 'vision' statistics"):
        significance_heatmaps(stats, tmp_path / "x.png", group="vision")
    with pytest.raises(ValueError, match="nothing to plot"):
        allocation_heatmap([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
