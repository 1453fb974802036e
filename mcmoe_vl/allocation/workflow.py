"""Allocate from a statistics file and save the plan (what ``mcmoe-vl allocate`` runs); ``pmq+`` also loads the
model and the plan-building and selection data (:func:`allocate_plus_files`)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from pydantic import BaseModel, ConfigDict, Field

from mcmoe_vl.calibration.stats import load_stats
from mcmoe_vl.io import check_output_outside
from mcmoe_vl.quant.plan import BitPlan

from .allocate import allocate
from .config import AllocationConfig
from .plus import PlusConfig, allocate_plus, build_candidates


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
    stats = load_stats(stats_path, verify=True)  # an edited or corrupted file is refused, never allocated from
    plan = allocate(stats, config)
    plan.save(output)
    if heatmap is not None:
        from mcmoe_vl.plots import allocation_heatmap

        allocation_heatmap(
            [lp.bits for lp in plan.layers], heatmap, layer_labels=[str(lp.index) for lp in plan.layers],
            title=f"{plan.allocator} bit allocation, {Path(str(stats_path)).stem}",
        )
    return plan


class PlusData(BaseModel):
    """The model and data ``pmq+`` measures candidates on (what ``mcmoe-vl allocate --method pmq+`` needs).

    ``data`` / ``num_sequences`` / ``seq_len`` / ``seed``: the plan-building data, the same as the calibration run
    that wrote the statistics (checked against their fingerprint when they have one). ``select_data``: the
    selection split (default: the same source, ``select_sequences`` other windows drawn with ``select_seed``;
    sequences also in the plan-building data are refused). Never pass evaluation data.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    data: str
    num_sequences: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=1)
    seed: int = 0
    select_data: str | None = None
    select_sequences: int = Field(32, ge=1)
    select_seed: int = 1
    batch_size: int = Field(1, ge=1)
    dtype: str = "float32"
    device: str = "cpu"


def plus_batches(run: PlusData) -> tuple[list[dict], list[dict]]:
    """(plan-building batches, selection batches) token ids as the run describes them."""
    from mcmoe_vl.calibration.data import batches_from_ids
    from mcmoe_vl.calibration.workflow import calibration_ids

    fit = calibration_ids(run)
    sel_run = SimpleNamespace(data=run.select_data or run.data, model=run.model, num_sequences=run.select_sequences,
                              seq_len=run.seq_len, seed=run.select_seed)
    sel = calibration_ids(sel_run)
    return (batches_from_ids(fit, run.batch_size), batches_from_ids(sel, run.batch_size))


def allocate_plus_files(stats_path: str | os.PathLike[str], output: str | os.PathLike[str], config: AllocationConfig,
                        data: PlusData, plus: PlusConfig | None = None, *,
                        heatmap: str | os.PathLike[str] | None = None) -> BitPlan:
    """Read the statistics, check the request and the data, load the model, run ``pmq+``, write the plan."""
    from mcmoe_vl.calibration.calibrate import prepare_batches
    from mcmoe_vl.calibration.workflow import load_model
    from mcmoe_vl.dtypes import parse_dtype

    plus = plus or PlusConfig()
    inputs = {"statistics file": stats_path, "model directory": data.model, "calibration data": data.data,
              **({"selection data": data.select_data} if data.select_data else {})}
    for out in (output, heatmap):
        if out is not None:
            check_output_outside(out, inputs)
    stats = load_stats(stats_path, verify=True)  # an edited or corrupted file is refused, never allocated from
    build_candidates(stats, config, plus)  # a bad request fails before the model is loaded
    fit, sel = plus_batches(data)
    fp = prepare_batches(fit)[1]
    if stats.data_fingerprint is not None and fp != stats.data_fingerprint:
        raise ValueError(f"{data.data}: these plan-building windows are not the data the statistics in {stats_path} "
                         "came from; pass the calibration run's --data, --num-sequences, --seq-len and --seed")
    model = load_model(data.model, dtype=parse_dtype(data.dtype), device=data.device)
    move = lambda bs: [{k: v.to(data.device) for k, v in b.items()} for b in bs]  # noqa: E731
    from model_adapters import get_adapter

    plan = allocate_plus(model, stats, move(fit), move(sel), config, plus, adapter=get_adapter(model))
    plan.save(output)
    if heatmap is not None:
        from mcmoe_vl.plots import allocation_heatmap

        allocation_heatmap([lp.bits for lp in plan.layers], heatmap, layer_labels=[str(lp.index) for lp in plan.layers],
                           title=f"pmq+ ({plan.selection['chosen']}) bit allocation, {Path(str(stats_path)).stem}")
    return plan
