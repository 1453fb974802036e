"""The plan the quantization engine consumes: a width for every routed expert and every other linear layer.

Two JSON forms are accepted by :func:`load_plan`:

1. The allocator's :class:`mcmoe_vl.allocation.plan.BitPlan` (``"format_version": 1``, ``"layers": [...]``), as
   written by ``mcmoe-vl allocate``.
2. A minimal hand-written plan::

       {
         "format": "mcmoe_vl.quant_plan",
         "version": 1,
         "model_type": "mixtral",
         "experts": {"0": [2, 2, 3, 1, 2, 2, 4, 2], "1": [2, 2, 2, 2, 2, 2, 2, 2]},
         "default_bits": 4,
         "shared_experts_bits": 4,
         "modules": {"model.layers.0.self_attn.o_proj": 16, "re:.*\\\\.q_proj$": 3},
         "keep_16bit": ["embed_tokens", "lm_head", "norm", "vision"],
         "group_size": 128,
         "metadata": {"allocator": "hand", "target_bits": 2.0}
       }

``experts[layer][i]`` is the width (1, 2, 3, 4 or 16 = unquantized) of routed expert i of decoder layer ``layer``.
``default_bits`` is the width of every other linear layer of the language model (attention, router, dense MLPs);
``shared_experts_bits`` that of shared experts. ``modules`` overrides single modules by their full name, or by a
regular expression when the key starts with ``re:``; 16 keeps a module unquantized. ``keep_16bit`` lists name
fragments that are never quantized (a module whose dotted name contains a fragment as a component prefix, e.g.
``vision`` matches ``model.vision_tower.x``) unless a ``modules`` entry names them.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mcmoe_vl.io import read_json, write_json_atomic

from .widths import check_width, valid_widths

QUANT_PLAN_FORMAT = "mcmoe_vl.quant_plan"
QUANT_PLAN_VERSION = 1
VALID_BITS = valid_widths(unquantized=True)
DEFAULT_KEEP_16BIT = ["embed_tokens", "lm_head", "norm", "vision"]


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model; the message names what is wrong and what is valid."""


def _check_width(b: int, where: str) -> int:
    return check_width(b, where=where, unquantized=True)


class QuantPlan(BaseModel):
    """Widths for every quantized weight of a model (see the module docstring for the JSON form)."""

    model_config = ConfigDict(extra="forbid")

    format: str = QUANT_PLAN_FORMAT
    version: int = QUANT_PLAN_VERSION
    model_type: str | None = None
    experts: dict[int, list[int]]  # decoder layer index -> width per routed expert
    default_bits: int = 4
    shared_experts_bits: int = 4
    modules: dict[str, int] = Field(default_factory=dict)  # full module name or "re:<regex>" -> width
    keep_16bit: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_16BIT))
    group_size: int = 128
    metadata: dict[str, Any] = Field(default_factory=dict)  # allocator, target, achieved averages, ...

    @field_validator("format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        if v != QUANT_PLAN_FORMAT:
            raise ValueError(f"format must be {QUANT_PLAN_FORMAT!r}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> QuantPlan:
        if self.version != QUANT_PLAN_VERSION:
            raise ValueError(f"plan version {self.version} is not supported (this engine reads {QUANT_PLAN_VERSION})")
        for layer, bits in self.experts.items():
            if not bits:
                raise ValueError(f"experts[{layer}] is empty")
            for i, b in enumerate(bits):
                _check_width(b, f"experts[{layer}][{i}]")
        _check_width(self.default_bits, "default_bits")
        _check_width(self.shared_experts_bits, "shared_experts_bits")
        for name, b in self.modules.items():
            _check_width(b, f"modules[{name!r}]")
            if name.startswith("re:"):
                try:
                    re.compile(name[3:])
                except re.error as exc:
                    raise ValueError(f"modules[{name!r}]: invalid regular expression ({exc})") from exc
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        return self

    # -- queries -----------------------------------------------------------------------------------------------
    def expert_bits(self, layer: int, num_experts: int) -> list[int]:
        """Widths of the routed experts of decoder layer ``layer`` (checked against the model's expert count)."""
        if layer not in self.experts:
            raise PlanError(f"the plan has no widths for MoE layer {layer}; plan layers: {sorted(self.experts)}")
        bits = self.experts[layer]
        if len(bits) != num_experts:
            raise PlanError(f"layer {layer}: the plan gives {len(bits)} widths but the model has {num_experts} "
                            "experts; the plan was made for another model")
        return list(bits)

    def check_layers(self, moe_layers: dict[int, int]) -> None:
        """Raise unless the plan covers exactly these MoE layers (decoder index -> routed expert count)."""
        extra = sorted(set(self.experts) - set(moe_layers))
        if extra:
            raise PlanError(f"the plan has widths for layers {extra}, which have no MoE block in the model "
                            f"(MoE layers: {sorted(moe_layers)})")
        for idx, n in moe_layers.items():
            self.expert_bits(idx, n)

    def module_bits(self, name: str, *, shared_expert: bool = False) -> int:
        """Width of a non-expert linear layer called ``name`` (16 = left unquantized)."""
        if name in self.modules:
            return self.modules[name]
        for key, b in self.modules.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return b
        if self.is_kept_16bit(name):
            return 16
        return self.shared_experts_bits if shared_expert else self.default_bits

    def is_kept_16bit(self, name: str) -> bool:
        parts = name.split(".")
        return any(p.startswith(frag) for frag in self.keep_16bit for p in parts)

    # -- io ----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        data = self.model_dump(mode="json")
        data["experts"] = {str(k): v for k, v in sorted(self.experts.items())}
        write_json_atomic(path, data)

    @classmethod
    def uniform(cls, experts_per_layer: dict[int, int], bits: int, **kw: Any) -> QuantPlan:
        """Every routed expert at ``bits``."""
        return cls(experts={i: [bits] * n for i, n in experts_per_layer.items()}, **kw)

    @classmethod
    def from_bit_plan(cls, plan: Any) -> QuantPlan:
        """Convert the allocator's :class:`mcmoe_vl.allocation.plan.BitPlan`."""
        settings = getattr(plan, "settings", {}) or {}
        group = settings.get("group_size", 128) if isinstance(settings, dict) else 128
        return cls(
            model_type=plan.model_type,
            experts={la.index: list(la.bits) for la in plan.layers},
            default_bits=plan.other_bits,
            shared_experts_bits=plan.shared_experts_bits,
            keep_16bit=list(plan.keep_16bit),
            group_size=int(group),
            metadata={"allocator": plan.allocator, "target": dict(plan.target), "achieved": dict(plan.achieved),
                      "starved": {la.index: list(la.starved) for la in plan.layers if la.starved},
                      "refit_1bit": bool(getattr(plan, "refit_1bit", False)),
                      **({"source": dict(plan.source)} if getattr(plan, "source", None) else {})},
        )


def plan_from_dict(data: Any, *, source: str = "plan") -> QuantPlan:
    """Build a :class:`QuantPlan` from either JSON form (hand-written or the allocator's BitPlan)."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan must be a JSON object, got {type(data).__name__}")
    try:
        if data.get("format") == QUANT_PLAN_FORMAT:
            return QuantPlan.model_validate(data)
        if "layers" in data and "format_version" in data:
            from mcmoe_vl.allocation.plan import BitPlan

            return QuantPlan.from_bit_plan(BitPlan.model_validate(data))
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise PlanError(f"{source}: invalid plan: {exc}") from exc
    raise PlanError(f"{source}: not a plan: expected \"format\": {QUANT_PLAN_FORMAT!r} (hand-written plan) or an "
                    "allocator BitPlan (\"format_version\" and \"layers\")")


def as_quant_plan(plan: Any) -> QuantPlan:
    """The engine's plan from any plan form: a :class:`QuantPlan`, the allocator's
    :class:`~mcmoe_vl.allocation.plan.BitPlan`, a plan dict (either JSON form) or a plan file path."""
    if isinstance(plan, QuantPlan):
        return plan
    from mcmoe_vl.allocation.plan import BitPlan

    if isinstance(plan, BitPlan):
        return QuantPlan.from_bit_plan(plan)
    if isinstance(plan, dict):
        return plan_from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    raise PlanError(f"a plan must be a QuantPlan, the allocator's BitPlan, a plan dict or a plan file path; got "
                    f"{type(plan).__name__}")


def load_plan(path: str | os.PathLike[str]) -> QuantPlan:
    """Read a plan file of either form."""
    return plan_from_dict(read_json(path, what="plan"), source=str(path))
