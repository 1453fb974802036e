"""A recipe of a suite: its quantization and pruning are the library's own config objects.

``quant`` holds an :class:`~mcmoe_vl.allocation.config.AllocationConfig` (``allocation``), a
:class:`~mcmoe_vl.quant.model.QuantizeConfig` (``gptq``) and, for ``method = "pmq+"``, a
:class:`~mcmoe_vl.allocation.plus.PlusConfig` (``plus``). The allocation settings are written flat in the ``quant``
table, under the allocation config's own names::

    quant = { method = "pmq", target_bits = 2.0 }                           # the paper's PMQ, widths 1, 2, 3
    quant = { method = "uniform", target_bits = 2 }                         # uniform 2-bit GPTQ (widths [2])
    quant = { method = "pmq", target_bits = 2.5, bits = [2, 3, 4], scope = "global", gptq = { act_order = true } }
    quant = { method = "pmq+", target_bits = 2.0, plus = { max_candidates = 4 } }

``prune`` is an :class:`~mcmoe_vl.pruning.odp.ODPConfig` or an :class:`~mcmoe_vl.pruning.otp.OTPConfig`, chosen by
``method``::

    prune = { method = "odp", prune_rate = 0.15, protect_ratio = 0.02 }
    prune = { method = "otp", prune_rate = 0.15, steps = 200 }

A resolved recipe (``Suite.model_dump``, the run directory's ``suite.resolved.json``) writes the allocation settings
under ``allocation = {...}``; both forms read back as the same recipe.

What a recipe does not choose comes from the suite: the seeds (``AllocationConfig.seed`` of the random allocator,
``OTPConfig.seed``) and, unless ``gptq`` / ``plus`` name it, ``min_tokens`` (the ``calibration`` table's).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mcmoe_vl.allocation.budget import BudgetKind
from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.allocation.plus import PlusConfig
from mcmoe_vl.pruning.method import PruningMethod
from mcmoe_vl.pruning.odp import ODPConfig
from mcmoe_vl.pruning.otp import OTPConfig
from mcmoe_vl.quant.model import QuantizeConfig

PruneConfig = Annotated[ODPConfig | OTPConfig, Field(discriminator="method")]
PRUNE_CONFIGS: dict[str, type[BaseModel]] = {PruningMethod.ODP.value: ODPConfig, PruningMethod.OTP.value: OTPConfig}
PLUS_METHOD = "pmq+"

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()\-]*$")


def check_name(value: str, what: str) -> str:
    """A suite, model or recipe name (``what``): letters, digits, space and ._+()-, starting with a letter or digit."""
    if not NAME_PATTERN.match(value):
        raise ValueError(f"{what} names use letters, digits, space and ._+()-, got {value!r}")
    return value
_QUANT_TABLES = ("allocation", "gptq", "plus")
# keys of the suite format before the recipe embedded AllocationConfig -> their name now
_FORMER = {"allocator": "method", "bit_set": "bits"}


def quant_keys() -> list[str]:
    """Every key a recipe's ``quant`` table takes: the allocation config's fields, then ``gptq`` and ``plus``."""
    return [k for k in AllocationConfig.model_fields if k != "seed"] + ["gptq", "plus"]


def _unknown_quant_keys(keys: list[str], flat: Mapping[str, Any]) -> str:
    hints = [f"{k!r} is now {_FORMER[k]!r}" for k in keys if k in _FORMER]
    if _is_number(flat.get("bits")):
        hints.append("the average 'bits' is now 'target_bits'")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unknown quant keys {keys}{hint}; valid: {', '.join(quant_keys())}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _no_seed(table: Mapping[str, Any], where: str) -> None:
    """A seed other than the default is an error: the run's seed is used (a resolved recipe records the default)."""
    if table.get("seed", 0) != 0:
        raise ValueError(f"{where}.seed is not a recipe setting: the run's seed is used (the suite's seeds or the "
                         "recipe's seeds)")


def _resolve_allocation(alloc: dict[str, Any]) -> dict[str, Any]:
    """The recipe's defaults: ``target_bits`` required; ``uniform`` without ``bits`` uses the one width
    ``int(target_bits)``; a single width needs no width to be present in every layer."""
    target, bits = alloc.get("target_bits"), alloc.get("bits")
    if _is_number(bits):
        raise ValueError(f"quant.bits is the set of widths the allocator chooses from (e.g. [1, 2, 3]), got {bits!r}; "
                         "the average width is target_bits")
    if target is None:
        raise ValueError("quant.target_bits is required: the average bits per expert weight, e.g. 2.0")
    if bits is None and alloc.get("method") == "uniform" and _is_number(target):
        alloc["bits"] = bits = [int(target)]
    if "require_widths" not in alloc and isinstance(bits, (list, tuple)) and len(set(bits)) == 1:
        alloc["require_widths"] = []
    return alloc


class QuantRecipe(BaseModel):
    """Expert quantization of a recipe (see the module docstring): the allocation config, the GPTQ engine's config
    and, for ``pmq+``, its candidate settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allocation: AllocationConfig
    gptq: QuantizeConfig = Field(default_factory=QuantizeConfig)
    plus: PlusConfig | None = None  # method "pmq+" only (default: PlusConfig())

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        flat = {k: data.pop(k) for k in list(data) if k in AllocationConfig.model_fields}
        unknown = sorted(set(data) - set(_QUANT_TABLES))
        if unknown:
            raise ValueError(_unknown_quant_keys(unknown, flat))
        if flat and "allocation" in data:
            raise ValueError(f"quant gives {sorted(flat)} both flat and in its allocation table; give them once")
        alloc = data.pop("allocation", flat)
        if isinstance(alloc, Mapping):
            _no_seed(alloc, "quant")
        data["allocation"] = _resolve_allocation(dict(alloc)) if isinstance(alloc, Mapping) else alloc
        method = data["allocation"].get("method") if isinstance(data["allocation"], Mapping) else \
            data["allocation"].method
        if method == PLUS_METHOD and data.get("plus") is None:
            data["plus"] = PlusConfig()
        return data

    @model_validator(mode="after")
    def _check(self) -> QuantRecipe:
        a = self.allocation
        if self.plus is not None and a.method != PLUS_METHOD:
            raise ValueError(f"quant.plus is for method {PLUS_METHOD!r}, this recipe's method is {a.method!r}")
        if a.method == "uniform" and a.budget is BudgetKind.NOMINAL and a.target_bits != int(a.target_bits):
            raise ValueError(f"uniform quantization needs a whole number of target_bits, got {a.target_bits}")
        return self


def _check_prune(v: Any) -> Any:
    """A clear error for a missing or unknown pruning method (the union's own error would print enum members)."""
    if isinstance(v, Mapping):
        method = v.get("method")
        if method is None:
            raise ValueError(f"prune.method is required; valid: {', '.join(PRUNE_CONFIGS)}")
        if isinstance(method, str) and method not in PRUNE_CONFIGS:
            raise ValueError(f"prune.method {method!r} is not a pruning method; valid: {', '.join(PRUNE_CONFIGS)}")
        _no_seed(v, "prune")
    return v


class RecipeSpec(BaseModel):
    """A compression configuration: optional quantization, then optional pruning. Neither: the 16-bit baseline."""

    model_config = ConfigDict(extra="forbid")

    name: str
    quant: QuantRecipe | None = None
    prune: PruneConfig | None = None
    models: list[str] | None = None  # restrict to these model names (default: every model)
    # calibration seeds of this recipe (default: the suite's); e.g. [0] for the 16-bit row, which no seed changes
    seeds: list[int] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "recipe")

    @field_validator("prune", mode="before")
    @classmethod
    def _prune(cls, v: Any) -> Any:
        return _check_prune(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"recipe seeds must be a non-empty list without repeats, got {v}")
        return v

    @property
    def is_baseline(self) -> bool:
        return self.quant is None and self.prune is None

    def with_min_tokens(self, min_tokens: int) -> RecipeSpec:
        """This recipe with ``min_tokens`` in its GPTQ and pmq+ configs where the recipe does not set it."""
        q = self.quant
        if q is None:
            return self
        update: dict[str, Any] = {}
        if "min_tokens" not in q.gptq.model_fields_set:
            update["gptq"] = q.gptq.model_copy(update={"min_tokens": min_tokens})
        if q.plus is not None and "min_tokens" not in q.plus.model_fields_set:
            update["plus"] = q.plus.model_copy(update={"min_tokens": min_tokens})
        return self.model_copy(update={"quant": q.model_copy(update=update)}) if update else self
