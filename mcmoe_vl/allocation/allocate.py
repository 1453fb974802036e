"""From calibration statistics to a bit plan: ``allocate(stats, config) -> BitPlan``.

::

    from mcmoe_vl.allocation.allocate import allocate
    from mcmoe_vl.allocation.config import AllocationConfig

    plan = allocate(stats, AllocationConfig(method="pmq", target_bits=2.54))
    plan.save("runs/plan.json")

The allocator (``config.method``, any name in :data:`~mcmoe_vl.allocation.allocators.ALLOCATORS`) returns one
width per expert; the plan records them per layer with the allocator's settings, the target and the achieved
nominal / effective averages over the routed experts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from mcmoe_vl.calibration.stats import CalibrationStats
from mcmoe_vl.quant.plan import BitPlan, LayerPlan

from .allocators import LayerInputs, allocate_layers
from .budget import AllocationError, BudgetKind, effective_bits
from .config import AllocationConfig

log = logging.getLogger(__name__)


def inputs_from_stats(stats: CalibrationStats) -> list[LayerInputs]:
    """The allocator's view of the statistics (all-token counts and weights, eps and HAWQ tables)."""
    if not stats.layers:
        raise AllocationError("the calibration statistics have no finished MoE layers")
    if not stats.complete:
        done = [la.index for la in stats.layers]
        missing = [i for i in stats.moe_layer_indices if i not in done]
        raise AllocationError(
            f"the calibration statistics are incomplete: MoE layers {missing} are missing "
            f"(finished {len(done)} of {len(stats.moe_layer_indices)}); resume the calibration run first"
        )
    return [
        LayerInputs(
            index=la.index,
            path=la.path,
            counts=np.asarray(la.all.counts, dtype=np.int64),
            weight_sum=np.asarray(la.all.weight_sum, dtype=np.float64),
            eps={int(k): np.asarray(v, dtype=np.float64) for k, v in la.eps.items()},
            hawq={int(k): np.asarray(v, dtype=np.float64) for k, v in la.hawq.items()},
        )
        for la in stats.layers
    ]


def check_feasible(layout: Mapping[int, int], config: AllocationConfig) -> None:
    """Run the allocator on stand-in statistics of the model's layout (decoder layer -> routed experts), so that
    every check that does not depend on the statistics (the target's reachable range for the bit set and width
    constraints, uniform needing a target equal to a width, the block widths) fails now, before calibration.
    Raises :class:`AllocationError` naming the layer and the valid range. ``pmq+``: some default candidate must
    reach the target (:func:`mcmoe_vl.allocation.plus.check_feasible_plus`)."""
    if config.method == "pmq+":
        from .plus import check_feasible_plus

        return check_feasible_plus(layout, config)
    stand_in = [
        LayerInputs(index=i, path=f"{n} experts", counts=np.ones(n, dtype=np.int64), weight_sum=np.ones(n),
                    eps={b: np.full(n, 2.0 ** -b) for b in config.bits},
                    hawq={b: np.full(n, 2.0 ** -b) for b in config.bits})
        for i, n in sorted(layout.items())
    ]
    allocate_layers(stand_in, config)


def check_layout(have: Mapping[int, int], want: Mapping[int, int], *, what: str) -> None:
    """Raise :class:`AllocationError` naming the first layer whose expert count differs (or that is missing)."""
    for idx in sorted(set(have) | set(want)):
        if idx not in have:
            raise AllocationError(f"layer {idx}: the model has a MoE layer here but the {what} does not cover it")
        if idx not in want:
            raise AllocationError(f"layer {idx}: the {what} describes a MoE layer here but the model has none "
                                  f"(model MoE layers: {sorted(want)})")
        if have[idx] != want[idx]:
            raise AllocationError(f"layer {idx}: the {what} describes {have[idx]} experts but the model has "
                                  f"{want[idx]}; it was made for another model")


def layer_averages(bits: list[int], *, group_size: int = 128, param_bits: int = 16) -> tuple[float, float]:
    """(nominal, effective) average bits of a layer's expert widths (equal-sized experts)."""
    n = len(bits)
    nominal = sum(bits) / n
    eff = sum(effective_bits(b, group_size=group_size, param_bits=param_bits) for b in bits) / n
    return nominal, eff


def allocate(
    stats: CalibrationStats,
    config: AllocationConfig | None = None,
    *,
    experts_per_layer: Mapping[int, int] | None = None,
    min_tokens: int | None = None,
) -> BitPlan:
    """Allocate expert widths from ``stats``.

    ``experts_per_layer`` (decoder layer index -> routed experts), when given, must match the statistics: a plan
    for another model is an error naming the layer. ``min_tokens`` overrides the calibration's threshold for
    listing starved experts in the plan.
    """
    config = config or AllocationConfig()
    if experts_per_layer is not None:
        check_layout({la.index: la.num_experts for la in stats.layers}, experts_per_layer, what="statistics file")
    layers = inputs_from_stats(stats)
    widths = allocate_layers(layers, config)
    plans = []
    for la, w, ls in zip(layers, widths, stats.layers):
        bits = [int(b) for b in w]
        nominal, eff = layer_averages(bits, group_size=config.group_size, param_bits=config.param_bits)
        starved = ls.starved if min_tokens is None else ls.starved_experts(min_tokens)
        plans.append(LayerPlan(index=la.index, path=la.path, bits=bits, nominal=nominal, effective=eff,
                               starved=starved))
    all_bits = [b for p in plans for b in p.bits]
    nominal, eff = layer_averages(all_bits, group_size=config.group_size, param_bits=config.param_bits)
    plan = BitPlan(
        model_type=stats.model_type,
        allocator=config.method,
        settings=config.model_dump(mode="json"),
        target={"bits": config.target_bits, "budget": config.budget.value},
        achieved={"nominal": nominal, "effective": eff},
        layers=plans,
        group_size=config.group_size,
        shared_experts_bits=config.shared_experts_bits,
        other_bits=config.other_bits,
        source={"model_fingerprint": stats.model_fingerprint, "data_fingerprint": stats.data_fingerprint},
    )
    got = eff if config.budget is BudgetKind.EFFECTIVE else nominal
    if abs(got - config.target_bits) > 1e-9:
        log.info("%s: achieved %.4f %s bits for a target of %.4f (budget not exactly reachable)",
                 config.method, got, config.budget.value, config.target_bits)
    return plan
