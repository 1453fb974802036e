"""The bit plan: which width every routed expert (and every other quantized module) gets. JSON a person can read.

::

    {
      "format_version": 1,
      "model_type": "mixtral",
      "allocator": "pmq",
      "settings": {... the AllocationConfig ...},
      "target": {"bits": 2.0, "budget": "nominal"},
      "achieved": {"nominal": 2.0, "effective": 2.2421875},
      "layers": [{"index": 0, "path": "model.layers.0.mlp", "bits": [3, 2, 1, 2, ...], "nominal": 2.0, ...}],
      "shared_experts_bits": 4,
      "other_bits": 4,
      "keep_16bit": ["embed_tokens", "lm_head", "norm", "vision"]
    }

``layers[*].bits[i]`` is expert i's width. ``other_bits`` is the width of every other linear layer of the language
model (attention, router, dense MLPs); ``shared_experts_bits`` that of shared experts (not in the program).
``refit_1bit``: quantize 1-bit experts with the Hessian-weighted scale refit (the quantization engine follows it
unless told otherwise). ``selection`` (the ``pmq+`` allocator): the candidate plans, their measured calibration
losses, the data they were measured on and the choice (:mod:`mcmoe_vl.allocation.plus`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mcmoe_vl.io import read_json, write_json_atomic

from mcmoe_vl.quant.widths import check_widths

from .budget import AllocationError, effective_bits

PLAN_FORMAT_VERSION = 1


class LayerPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int  # decoder layer index
    path: str
    bits: list[int]  # one width per routed expert
    nominal: float = 0.0  # this layer's average nominal bits
    effective: float = 0.0  # this layer's average effective bits
    starved: list[int] = Field(default_factory=list)  # experts with too few calibration tokens

    @property
    def num_experts(self) -> int:
        return len(self.bits)


class BitPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = PLAN_FORMAT_VERSION
    model_type: str
    allocator: str
    settings: dict = Field(default_factory=dict)
    target: dict = Field(default_factory=dict)  # {"bits": float, "budget": "nominal" | "effective"}
    achieved: dict[str, float] = Field(default_factory=dict)  # expert averages: nominal, effective
    layers: list[LayerPlan]
    shared_experts_bits: int = 4
    other_bits: int = 4
    keep_16bit: list[str] = Field(default_factory=lambda: ["embed_tokens", "lm_head", "norm", "vision"])
    # what the statistics were measured on: {"model_fingerprint": ..., "data_fingerprint": ...} (quantizing another
    # model's weights with this plan is refused, see mcmoe_vl.quant.workflow)
    source: dict = Field(default_factory=dict)
    refit_1bit: bool = False
    selection: dict | None = None

    @model_validator(mode="after")
    def _check(self) -> BitPlan:
        idx = [la.index for la in self.layers]
        if len(set(idx)) != len(idx):
            raise ValueError(f"a layer appears twice in the plan: {idx}")
        for la in self.layers:
            check_widths(la.bits, where=f"layer {la.index}: bits", unquantized=True)
        return self

    def layer(self, index: int) -> LayerPlan:
        for la in self.layers:
            if la.index == index:
                return la
        raise KeyError(f"the plan has no decoder layer {index}; plan layers: {[la.index for la in self.layers]}")

    def expert_bits(self) -> dict[int, list[int]]:
        return {la.index: list(la.bits) for la in self.layers}

    def check_matches(self, experts_per_layer: Mapping[int, int]) -> None:
        """Raise unless the plan covers exactly these MoE layers (decoder index -> routed expert count)."""
        check_layout({la.index: la.num_experts for la in self.layers}, experts_per_layer, what="plan")

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitPlan:
        data = read_json(path, what="bit plan")
        if not isinstance(data, dict) or data.get("format_version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"{path}: not a bit plan of format version {PLAN_FORMAT_VERSION}")
        return cls.model_validate(data)


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
