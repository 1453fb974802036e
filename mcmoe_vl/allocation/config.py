"""Typed configuration of a bit allocation.

Example (the paper's setting: per-layer programs, 2.0 nominal bits over {1, 2, 3}, alpha = beta = 1, gamma = 2)::

    AllocationConfig(method="pmq", target_bits=2.0)
    AllocationConfig(method="pmq", target_bits=2.25, budget="effective", scope="global", bits=(1, 2, 3, 4))
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mcmoe_vl.quant.widths import check_width, check_widths

from .budget import BudgetKind
from .program import Solver


class Scope(str, enum.Enum):
    LAYER = "layer"  # one program per MoE layer, each with the target average (the paper)
    GLOBAL = "global"  # one program over all layers with one model-wide budget


class AllocationConfig(BaseModel):
    """How to allocate expert bit widths. See :mod:`mcmoe_vl.allocation.allocators` for the methods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "pmq"
    target_bits: float = 2.0
    budget: BudgetKind = BudgetKind.NOMINAL
    bits: tuple[int, ...] = (1, 2, 3)
    scope: Scope = Scope.LAYER
    alpha: float = Field(1.0, ge=0)  # exponent of the access frequency phi
    beta: float = Field(1.0, ge=0)  # exponent of the activation weight w
    gamma: float = Field(2.0, ge=0)  # exponent of the quantization error eps
    # Widths that need at least one expert in every layer. None: the paper's constraint, widths 2 and 3 (those of
    # them in ``bits``). An empty tuple disables the constraint.
    require_widths: tuple[int, ...] | None = None
    solver: Solver = Solver.CBC
    time_limit_s: float = Field(60.0, gt=0)
    seed: int = 0  # the random baseline
    block_widths: tuple[int, int] = (2, 4)  # the block (BSP-like) baseline: (low, high) layer widths
    group_size: int = Field(128, ge=1)  # effective-bit accounting
    param_bits: int = Field(16, ge=1)  # bits of each stored scale / zero
    other_bits: int = 4  # every other quantized linear layer (attention, router, dense MLPs)
    shared_experts_bits: int = 4  # shared experts are not in the program (METHOD.md section 3)
    # One width for all routed experts of a layer (serving engines need one format per layer; docs/interop.md).
    # The budget is then model-wide, and the per-layer required widths cannot apply (one width cannot meet them).
    per_layer_uniform: bool = False

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("the bit set is empty; give at least one width, e.g. (1, 2, 3)")
        check_widths(v, where="bits", unique=True)
        return tuple(sorted(v))

    @field_validator("other_bits", "shared_experts_bits")
    @classmethod
    def _module_width(cls, v: int, info: ValidationInfo) -> int:
        return check_width(v, where=str(info.field_name), unquantized=True)

    @field_validator("block_widths")
    @classmethod
    def _block_widths(cls, v: tuple[int, int]) -> tuple[int, int]:
        check_widths(v, where="block_widths", unquantized=True)
        return v

    @model_validator(mode="after")
    def _check(self) -> AllocationConfig:
        if self.require_widths is not None:
            bad = [w for w in self.require_widths if w not in self.bits]
            if bad:
                raise ValueError(f"require_widths {bad} are not in the bit set {list(self.bits)}")
        if self.per_layer_uniform and self.require_widths:
            raise ValueError(f"per_layer_uniform gives each layer one width, so require_widths "
                             f"{list(self.require_widths)} cannot hold; leave it unset or empty")
        lo, hi = self.block_widths
        if not lo < hi:
            raise ValueError(f"block_widths must be (low, high) with low < high, got {self.block_widths}")
        return self

    @property
    def required(self) -> tuple[int, ...]:
        """The widths that need >= 1 expert per layer (resolved default)."""
        if self.per_layer_uniform:
            return ()
        if self.require_widths is not None:
            return tuple(sorted(set(self.require_widths)))
        return tuple(w for w in (2, 3) if w in self.bits)
