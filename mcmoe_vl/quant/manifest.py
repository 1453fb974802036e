"""The checkpoint manifest (``quant_manifest.json``): a typed record of what the tensor file holds and how it was made.

::

    {"format": "mcmoe_vl.quantized", "format_version": 2, "model_type": "mixtral", "architecture":
     "MixtralForCausalLM", "adapter": "mixtral", "config": {... the HF config ...}, "dtype": "bfloat16",
     "attn_implementation": "eager", "plan": {... the BitPlan ...}, "quantize_config": {...}, "report": {...},
     "quantized": {"model.layers.0.self_attn.q_proj": {"bits": 4, "shape": [64, 64], "group_size": 128,
                   "perm": false, "bias": false, "dtype": "bfloat16"}, ...},
     "experts": {"model.layers.0.mlp.experts": {"layout": "fused", "experts": [{"kind": "quant", "bits": 2},
                 {"kind": "dense", "bits": 16}, ...]}},
     "tensors": {name: {"dtype": "bfloat16", "shape": [...]}}, "aliases": {name: stored name},
     "file": {"name": "model.safetensors", "bytes": 71832, "sha256": "..."}, "accounting": {...},
     "integrity": {"algorithm": "sha256", "digest": "..."}}

:func:`read_manifest` checks the format and version, validates every field (an unknown or malformed one is named,
with the valid keys) and the ``integrity`` digest: a SHA-256 over the manifest's own canonical JSON (every other
key, the tensor file's SHA-256 included), so an edited manifest (bits, plan, accounting, the model config inside it)
is refused rather than loaded. It guards against accidents and hand edits, not against someone who recomputes it:
like safetensors' header checks, it is integrity, not authenticity. Manifests written before the plan types became
one hold the engine's former plan form; their ``plan`` is read into a :class:`~mcmoe_vl.quant.plan.BitPlan`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mcmoe_vl.io import _json_default, read_json
from mcmoe_vl.validation import describe_validation_error

from .accounting import Accounting
from .format import FORMAT, FORMAT_VERSION, MANIFEST_FILE, PRUNING_FILE, QUANT_METHOD, CheckpointError
from .model import QuantizeConfig, QuantReport
from .plan import BitPlan, plan_from_dict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: list[int]


class QuantizedModule(_Strict):
    """A packed linear layer: ``<name>.qdata / .scale / .zero / .perm`` in the tensor file."""

    bits: int
    shape: list[int]  # (out_features, in_features)
    group_size: int
    perm: bool  # act-order permutation stored
    bias: bool
    dtype: str  # compute dtype


class ExpertItem(_Strict):
    kind: Literal["quant", "dense"]
    bits: int


class ExpertsModule(_Strict):
    """A fused experts module: one item per routed expert, packed (``quant``) or kept 16-bit (``dense``)."""

    layout: Literal["fused"]
    experts: list[ExpertItem]


class TensorFile(_Strict):
    name: str
    bytes: int
    sha256: str


class Integrity(_Strict):
    algorithm: Literal["sha256"] = "sha256"
    digest: str


class Manifest(_Strict):
    """Everything a loader needs besides the tensors (see the module docstring)."""

    format: Literal["mcmoe_vl.quantized"] = FORMAT  # read_manifest checks format and version first
    format_version: int = FORMAT_VERSION
    model_type: str | None
    architecture: str  # the transformers class
    adapter: str | None = None
    config: dict[str, Any] | None  # the Hugging Face config, without its quantization_config
    dtype: str
    attn_implementation: str | None = None
    plan: BitPlan
    quantize_config: QuantizeConfig
    report: QuantReport | None = None
    quantized: dict[str, QuantizedModule]
    experts: dict[str, ExpertsModule]
    tensors: dict[str, TensorSpec]
    aliases: dict[str, str]  # tied weight -> the name it is stored under
    file: TensorFile
    accounting: Accounting
    integrity: Integrity | None = None  # set by seal(); read_manifest requires it

    @field_validator("plan", mode="before")
    @classmethod
    def _read_plan(cls, v: Any) -> Any:
        return plan_from_dict(v, source="manifest plan") if isinstance(v, dict) else v

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON values written to disk."""
        return self.model_dump(mode="json")

    def seal(self) -> Manifest:
        """This manifest with its ``integrity`` digest (re)computed."""
        return self.model_copy(update={"integrity": Integrity(digest=manifest_digest(self.to_json()))})


def manifest_digest(manifest: dict) -> str:
    """SHA-256 over the manifest's canonical JSON, without its ``integrity`` entry."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def json_values(obj: Any) -> Any:
    """``obj`` as plain JSON values (a Hugging Face config dict may hold dtypes and other objects)."""
    return json.loads(json.dumps(obj, default=_json_default))


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` (a raw manifest dict) with its ``integrity`` digest (re)computed."""
    manifest = json_values(manifest)  # the digest is of what lands on disk
    return {**manifest, "integrity": {"algorithm": "sha256", "digest": manifest_digest(manifest)}}


def read_manifest(ckpt_dir: str | os.PathLike[str]) -> Manifest:
    """The checkpoint's manifest, checked: format, version, every field, and its integrity digest."""
    path = Path(ckpt_dir) / MANIFEST_FILE
    raw = read_json(path, what="quantized-checkpoint manifest")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {raw.get('format_version')} is not supported (this loader "
                              f"reads {FORMAT_VERSION}); re-run the quantization to rewrite the checkpoint")
    try:
        man = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: invalid manifest: {describe_validation_error(exc, Manifest)}; it was "
                              "edited or truncated: re-run the quantization") from None
    if man.integrity is None or man.integrity.digest != manifest_digest(raw):
        raise CheckpointError(f"{path} was edited after it was written (its integrity digest does not match its "
                              "content: bits, plan, accounting or model config changed); re-run the quantization "
                              "rather than editing the manifest")
    return man


def quantization_config_dict(manifest: Manifest) -> dict:
    """The ``quantization_config`` entry of config.json: what transformers needs to pick our loader."""
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "format_version": FORMAT_VERSION,
            "manifest": MANIFEST_FILE, "dtype": manifest.dtype, "pruning_file": PRUNING_FILE,
            "apply_pruning": True, "attn_implementation": manifest.attn_implementation}
