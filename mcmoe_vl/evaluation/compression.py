"""Typed parts of a results file's compression block: the quantization summary (with the engine's accounting) and
the pruning summary (ODP or OTP, told apart by ``method``).

These replace the dicts the runner used to build and the report used to read with ``'?'`` fallbacks: a field the
report needs is either present or has a documented default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from mcmoe_vl.allocation.budget import BudgetKind
from mcmoe_vl.allocation.config import Scope
from mcmoe_vl.pruning.artifact import PruningMethod
from mcmoe_vl.quant.qlinear import Runtime


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantAccounting(_Strict):
    """What the quantize stage measured on the saved checkpoint (:class:`mcmoe_vl.quant.accounting.Accounting`'s
    summary, the experts' nominal width, and the starved experts that fell back to round-to-nearest)."""

    nominal_bits: float  # experts + attention linears, codes only (paper style)
    effective_bits: float  # every stored byte x 8 / every parameter
    effective_bits_experts: float
    bytes_on_disk: int | None = None
    resident_bytes: int | None = None
    params: int
    expert_nominal_bits: float | None = None
    starved: dict[str, list[int]] = Field(default_factory=dict)  # decoder layer -> expert indices

    @classmethod
    def from_engine(cls, acct: object, starved: dict[int, list[int]]) -> QuantAccounting:
        """From the checkpoint engine's :class:`~mcmoe_vl.quant.accounting.Accounting` and the GPTQ report."""
        from mcmoe_vl.quant.accounting import Accounting

        assert isinstance(acct, Accounting)
        cat = acct.categories.get("experts")
        return cls(**acct.summary(), expert_nominal_bits=float(cat.nominal_bits) if cat is not None else None,
                   starved={str(k): list(v) for k, v in sorted(starved.items())})


class QuantInfo(_Strict):
    """The recipe's quantization settings, the plan it ran and what it cost."""

    allocator: str
    target_bits: float
    budget: BudgetKind = BudgetKind.NOMINAL
    bit_set: list[int] = Field(default_factory=list)
    scope: Scope = Scope.LAYER
    group_size: int = 128
    other_bits: int = 4
    runtime: Runtime | None = None  # the evaluation runtime
    plan: dict[str, list[int]] = Field(default_factory=dict)  # decoder layer -> expert widths
    plan_achieved: dict[str, float] = Field(default_factory=dict)  # nominal / effective expert averages
    starved_experts: int = 0
    chosen: str | None = None  # pmq+: the candidate chosen by calibration loss
    accounting: QuantAccounting | None = None


class _PruneInfo(_Strict):
    """What every pruning method records: its method, requested rate and the decoder layers it ran on."""

    method: PruningMethod
    prune_rate: float | None = None
    layers: list[int] | None = None


class ODPInfo(_PruneInfo):
    """ODP settings and the fitted thresholds (per decoder layer)."""

    method: Literal[PruningMethod.ODP]
    protect_ratio: float = 0.02
    quantile: float = 0.5
    mu_fixed: float | None = None
    mu: dict[str, float] | None = None
    calibration_pruned_fraction: dict[str, float] | None = None


class OTPInfo(_PruneInfo):
    """OTP settings and the trained predictors' summary (per decoder layer)."""

    method: Literal[PruningMethod.OTP]
    steps: int = 300
    width: int = 32
    summary: dict[str, dict[str, float]] | None = None


PruneInfo = Annotated[ODPInfo | OTPInfo, Field(discriminator="method")]
