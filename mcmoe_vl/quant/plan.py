"""The bit plan: the width of every routed expert and every other quantized linear layer. One type, from the allocator
(:func:`mcmoe_vl.allocation.allocate` returns it) to the quantization engine
(:func:`mcmoe_vl.quant.model.quantize_model` takes it as it is); JSON a person can read and write::

    {
      "format_version": 2,
      "model_type": "mixtral",
      "allocator": "pmq",
      "settings": {... the AllocationConfig ...},
      "target": {"bits": 2.0, "budget": "nominal"},
      "achieved": {"nominal": 2.0, "effective": 2.2421875},
      "layers": [{"index": 0, "path": "model.layers.0.mlp", "bits": [3, 2, 1, 2, ...], "nominal": 2.0, ...}],
      "group_size": 128,
      "shared_experts_bits": 4,
      "other_bits": 4,
      "modules": {"model.layers.0.self_attn.o_proj": 16, "re:.*\\\\.q_proj$": 3},
      "keep_16bit": ["embed_tokens", "lm_head", "norm", "vision"]
    }

A hand-written plan needs only ``layers`` (``index`` and ``bits`` of each MoE layer); every other key has a default.

``layers[*].bits[i]`` is the width (1, 2, 3, 4 or 16 = unquantized) of routed expert i of decoder layer ``index``.
``other_bits`` is the width of every other linear layer of the language model (attention, router, dense MLPs);
``shared_experts_bits`` that of shared experts (not in the allocator's program). ``modules`` overrides single
modules by their full name, or by a regular expression when the key starts with ``re:``; 16 keeps a module
unquantized. ``keep_16bit`` lists name fragments that are never quantized (a module whose dotted name contains a
fragment as a component prefix, e.g. ``vision`` matches ``model.vision_tower.x``) unless a ``modules`` entry names
them. ``source``: what the statistics were measured on (``model_fingerprint``, ``data_fingerprint``; quantizing
other weights with the plan is refused, see :mod:`mcmoe_vl.quant.workflow`). ``refit_1bit``: quantize 1-bit experts
with the Hessian-weighted scale refit (the engine follows it unless told otherwise). ``selection`` (the ``pmq+``
allocator): the candidate plans, their measured calibration losses, the data they were measured on and the choice
(:mod:`mcmoe_vl.allocation.plus`). ``metadata``: anything else a person wants to record.

:func:`load_plan` also reads the two older forms: the allocator's ``"format_version": 1`` plan (as this one, less
``group_size``, ``modules`` and ``metadata``; the group size was in ``settings``) and the engine's hand-written
``{"format": "mcmoe_vl.quant_plan", "version": 1, "experts": {"0": [2, 3, ...]}, "default_bits": 4, ...}``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mcmoe_vl.io import read_json, write_json_atomic
from mcmoe_vl.validation import describe_validation_error

from .widths import check_width, check_widths, valid_widths

PLAN_FORMAT_VERSION = 2
VALID_BITS = valid_widths(unquantized=True)
DEFAULT_KEEP_16BIT = ("embed_tokens", "lm_head", "norm", "vision")
# the engine's hand-written plan before the two plan types became one (read by load_plan)
LEGACY_QUANT_PLAN_FORMAT = "mcmoe_vl.quant_plan"


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model; the message names what is wrong and what is valid."""


class LayerPlan(BaseModel):
    """The widths of one MoE layer's routed experts."""

    model_config = ConfigDict(extra="forbid")

    index: int  # decoder layer index
    bits: list[int]  # one width per routed expert
    path: str = ""  # the MoE block's module name, as the allocator saw it ("" in a hand-written plan)
    nominal: float = 0.0  # this layer's average nominal bits
    effective: float = 0.0  # this layer's average effective bits
    starved: list[int] = Field(default_factory=list)  # experts with too few calibration tokens

    @property
    def num_experts(self) -> int:
        return len(self.bits)


class BitPlan(BaseModel):
    """Widths for every quantized weight of a model (see the module docstring for the JSON form)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = PLAN_FORMAT_VERSION
    model_type: str | None = None  # None: a hand-written plan for any model with these MoE layers
    allocator: str = "hand"
    settings: dict[str, Any] = Field(default_factory=dict)  # the allocator's config
    target: dict[str, Any] = Field(default_factory=dict)  # {"bits": float, "budget": "nominal" | "effective"}
    achieved: dict[str, float] = Field(default_factory=dict)  # expert averages: nominal, effective
    layers: list[LayerPlan]
    group_size: int = 128
    shared_experts_bits: int = 4
    other_bits: int = 4
    modules: dict[str, int] = Field(default_factory=dict)  # full module name or "re:<regex>" -> width
    keep_16bit: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_16BIT))
    source: dict[str, Any] = Field(default_factory=dict)  # {"model_fingerprint": ..., "data_fingerprint": ...}
    refit_1bit: bool = False
    selection: dict[str, Any] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> BitPlan:
        if self.format_version != PLAN_FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported here (this type is version "
                             f"{PLAN_FORMAT_VERSION}; load_plan reads older files)")
        idx = [la.index for la in self.layers]
        if len(set(idx)) != len(idx):
            raise ValueError(f"a layer appears twice in the plan: {idx}")
        for la in self.layers:
            if not la.bits:
                raise ValueError(f"layer {la.index}: bits is empty")
            check_widths(la.bits, where=f"layer {la.index}: bits", unquantized=True)
        check_width(self.other_bits, where="other_bits", unquantized=True)
        check_width(self.shared_experts_bits, where="shared_experts_bits", unquantized=True)
        for name, b in self.modules.items():
            check_width(b, where=f"modules[{name!r}]", unquantized=True)
            if name.startswith("re:"):
                try:
                    re.compile(name[3:])
                except re.error as exc:
                    raise ValueError(f"modules[{name!r}]: invalid regular expression ({exc})") from exc
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        return self

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_experts(cls, experts: Mapping[int, list[int]], **kw: Any) -> BitPlan:
        """A plan from {decoder layer index: width per routed expert}; ``kw``: any other field."""
        return cls(layers=[LayerPlan(index=i, bits=list(b)) for i, b in sorted(experts.items())], **kw)

    @classmethod
    def uniform(cls, experts_per_layer: Mapping[int, int], bits: int, **kw: Any) -> BitPlan:
        """Every routed expert at ``bits``."""
        return cls.from_experts({i: [bits] * n for i, n in experts_per_layer.items()}, **kw)

    # -- queries -----------------------------------------------------------------------------------------------
    @property
    def experts(self) -> dict[int, list[int]]:
        """{decoder layer index: width per routed expert}."""
        return {la.index: list(la.bits) for la in self.layers}

    def layer(self, index: int) -> LayerPlan:
        for la in self.layers:
            if la.index == index:
                return la
        raise PlanError(f"the plan has no widths for MoE layer {index}; plan layers: "
                        f"{[la.index for la in self.layers]}")

    def expert_bits(self, layer: int, num_experts: int) -> list[int]:
        """Widths of the routed experts of decoder layer ``layer`` (checked against the model's expert count)."""
        bits = self.layer(layer).bits
        if len(bits) != num_experts:
            raise PlanError(f"layer {layer}: the plan gives {len(bits)} widths but the model has {num_experts} "
                            "experts; the plan was made for another model")
        return list(bits)

    def check_layers(self, moe_layers: Mapping[int, int]) -> None:
        """Raise unless the plan covers exactly these MoE layers (decoder index -> routed expert count)."""
        extra = sorted({la.index for la in self.layers} - set(moe_layers))
        if extra:
            raise PlanError(f"the plan has widths for layers {extra}, which have no MoE block in the model "
                            f"(MoE layers: {sorted(moe_layers)})")
        for idx, n in sorted(moe_layers.items()):
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
        return self.shared_experts_bits if shared_expert else self.other_bits

    def is_kept_16bit(self, name: str) -> bool:
        parts = name.split(".")
        return any(p.startswith(frag) for frag in self.keep_16bit for p in parts)

    # -- io ----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitPlan:
        """Read a plan file of any form (see :func:`load_plan`)."""
        return load_plan(path)


def check_plan_type(plan: Any) -> BitPlan:
    """``plan`` if it is a :class:`BitPlan`, else a :class:`PlanError` saying what to pass."""
    if not isinstance(plan, BitPlan):
        raise PlanError(f"a plan must be a BitPlan (the allocator's output; load_plan reads a plan file, "
                        f"plan_from_dict its JSON), got {type(plan).__name__}")
    return plan


# -- reading files ---------------------------------------------------------------------------------------------------
_BIT_PLAN_V1_KEYS = {"format_version", "model_type", "allocator", "settings", "target", "achieved", "layers",
                     "shared_experts_bits", "other_bits", "keep_16bit", "source", "refit_1bit", "selection"}


def _from_bit_plan_v1(data: dict[str, Any]) -> dict[str, Any]:
    """The allocator's version-1 plan: the group size was in its settings."""
    extra = sorted(set(data) - _BIT_PLAN_V1_KEYS)
    if extra:
        raise ValueError(f"unknown keys {extra} for a format_version 1 plan (its keys: {sorted(_BIT_PLAN_V1_KEYS)})")
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    return {**data, "format_version": PLAN_FORMAT_VERSION, "group_size": int(settings.get("group_size", 128))}


def _from_quant_plan_v1(data: dict[str, Any]) -> dict[str, Any]:
    """The engine's version-1 plan: experts as {layer: widths}, ``default_bits``, allocator facts in metadata."""
    data = dict(data)
    if data.pop("format") != LEGACY_QUANT_PLAN_FORMAT or data.pop("version", 1) != 1:
        raise ValueError(f"only version 1 of {LEGACY_QUANT_PLAN_FORMAT!r} is read")
    experts = data.pop("experts", None)
    if not isinstance(experts, dict):
        raise ValueError(f"experts must map a decoder layer index to its widths, got {experts!r}")
    meta = dict(data.pop("metadata", None) or {})
    starved = {int(k): v for k, v in (meta.pop("starved", None) or {}).items()}
    out: dict[str, Any] = {"format_version": PLAN_FORMAT_VERSION, **data}
    if "default_bits" in out:
        out["other_bits"] = out.pop("default_bits")
    for key in ("allocator", "target", "achieved", "source", "refit_1bit"):
        if key in meta:
            out[key] = meta.pop(key)
    out["layers"] = [{"index": int(k), "bits": v, "starved": starved.get(int(k), [])} for k, v in experts.items()]
    out["metadata"] = meta
    return out


def plan_from_dict(data: Any, *, source: str = "plan") -> BitPlan:
    """A :class:`BitPlan` from its JSON (this version, or either older form: see the module docstring)."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan must be a JSON object, got {type(data).__name__}")
    try:
        if data.get("format") == LEGACY_QUANT_PLAN_FORMAT:
            data = _from_quant_plan_v1(data)
        elif data.get("format_version") == 1 and "layers" in data:
            data = _from_bit_plan_v1(data)
        elif data.get("format_version", PLAN_FORMAT_VERSION) != PLAN_FORMAT_VERSION:
            raise PlanError(f"{source}: not a bit plan: expected \"format_version\": {PLAN_FORMAT_VERSION} with "
                            f"\"layers\" (or an older plan file: \"format_version\": 1, or \"format\": "
                            f"{LEGACY_QUANT_PLAN_FORMAT!r}), got format_version {data.get('format_version')!r}")
        return BitPlan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"{source}: invalid plan: {describe_validation_error(exc, BitPlan)}") from None
    except PlanError:
        raise
    except ValueError as exc:  # an older form that cannot be read
        raise PlanError(f"{source}: invalid plan: {exc}") from None


def load_plan(path: str | os.PathLike[str]) -> BitPlan:
    """Read a plan file (any form: see the module docstring)."""
    return plan_from_dict(read_json(path, what="bit plan"), source=str(path))
