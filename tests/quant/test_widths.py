"""Bit widths are validated in one place (mcmoe_vl.quant.widths) and every config and plan agrees with it."""

from __future__ import annotations

import pytest

from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.calibration.calibrate import CalibrationConfig
from mcmoe_vl.quant.packing import SUPPORTED_BITS
from mcmoe_vl.quant.plan import BitPlan, LayerPlan, plan_from_dict
from mcmoe_vl.quant.widths import QUANT_WIDTHS, check_width, check_widths
from mcmoe_vl.suite.schema import CalibrationSpec, QuantRecipe


def test_the_packer_and_the_plans_share_one_set_of_widths():
    assert SUPPORTED_BITS == QUANT_WIDTHS == (1, 2, 3, 4)
    assert check_widths([1, 2, 3, 4], where="w") == (1, 2, 3, 4)
    assert check_width(16, where="w", unquantized=True) == 16
    for bad in (0, 5, 8, 16, True, 2.0):
        with pytest.raises(ValueError, match="valid widths: \\[1, 2, 3, 4\\]"):
            check_width(bad, where="w")
    with pytest.raises(ValueError, match="widths repeat"):
        check_widths([2, 2], where="w", unique=True)


@pytest.mark.parametrize("width", [0, 5, 8])
def test_every_config_refuses_the_same_widths(width):
    """A suite recipe's widths, the allocation config (its widths, other-module and block widths), the calibration's
    eps widths (suite and library), the allocator's plan and the engine's plan all refuse a width the engine cannot
    store, with the same message."""
    msg = f"width {width} is not supported"
    makers = [
        lambda: QuantRecipe.model_validate({"method": "pmq", "target_bits": 2.0, "bits": [1, width]}),
        lambda: AllocationConfig(bits=(1, width)),
        lambda: AllocationConfig(other_bits=width),
        lambda: AllocationConfig(shared_experts_bits=width),
        lambda: AllocationConfig(method="block", block_widths=(1, width)),
        lambda: CalibrationSpec(eps_bits=[1, width]),
        lambda: CalibrationConfig(eps_bits=(1, width)),
        lambda: BitPlan(model_type="m", allocator="a", layers=[LayerPlan(index=0, path="p", bits=[2, width])]),
        lambda: BitPlan.from_experts({0: [2, width]}),
        lambda: plan_from_dict({"format": "mcmoe_vl.quant_plan", "version": 1, "experts": {"0": [2, width]}}),
    ]
    for make in makers:
        with pytest.raises(ValueError, match=msg):
            make()
    # 16 (unquantized) is a plan width, never an allocatable or measurable one
    BitPlan(model_type="m", allocator="a", layers=[LayerPlan(index=0, path="p", bits=[2, 16])])
    BitPlan.from_experts({0: [2, 16]})
    with pytest.raises(ValueError, match="width 16 is not supported"):
        AllocationConfig(bits=(1, 16))
