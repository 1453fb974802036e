"""One readable message from a pydantic validation error: each bad field by its dotted path, and what is valid there.

::

    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: {describe_validation_error(exc, Manifest)}") from None
    # -> "quantized.model.layers.0.q_proj.bits: Input should be a valid integer;
    #     tensors.x.dtyp: unknown key (valid: dtype, shape)"
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, lists and dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out.extend(_models_in(arg))
    return out


def _is_member(model: type[BaseModel], tag: str) -> bool:
    """``tag`` names this union member: its class name (a plain union) or a field default (a discriminated one)."""
    return tag == model.__name__ or any(str(getattr(f.default, "value", f.default)) == tag
                                        for f in model.model_fields.values())


def model_holding(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that holds the last element of ``loc`` (None where that is not a model's field). Where a field is a
    union of models, pydantic puts the member's tag (or class name) in ``loc``; it picks the member."""
    candidates: list[type[BaseModel]] = [model]
    for part in loc[:-1]:
        if len(candidates) > 1 and isinstance(part, str) and any(_is_member(m, part) for m in candidates):
            candidates = [m for m in candidates if _is_member(m, part)][:1]
            continue
        if not candidates:
            return None
        field = candidates[0].model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a list index or dict key: the same annotation's inner model applies
        candidates = _models_in(field.annotation)
    return candidates[0] if candidates else None


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """``field.path: what is wrong`` for each error of ``exc`` (raised validating ``model``), joined by ``; ``."""
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(x) for x in loc) or "(top level)"
        holder = model_holding(model, loc) if loc else None
        valid = f" (valid: {', '.join(holder.model_fields)})" if holder is not None else ""
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown key{valid}")
        elif err["type"] == "missing":
            parts.append(f"{where}: required key is missing")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)

