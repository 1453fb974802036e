"""The pruning artifact: fitted ODP thresholds or trained OTP predictors, saved next to a (compressed) checkpoint.

Files (written atomically): ``<name>.json`` (readable: method, model description, ODP thresholds or OTP settings,
what was measured while fitting) and, for OTP, ``<name>.safetensors`` beside it with the predictors' weights
(``layers.<decoder index>.<parameter>``). The JSON records the safetensors file's SHA-256.

The evaluation stage turns pruning on with::

    artifact = load_pruning("ckpt/pruning.json")
    with ExpertInterface(model, adapter) as iface:
        handle = apply_pruning(iface, artifact)      # validates layers / k / experts / hidden size first
        ...                                          # run the evaluation
        handle.remove()
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from mcmoe_vl.io import read_json, save_safetensors_atomic, write_json_atomic
from mcmoe_vl.moe.interface import ExpertInterface

from .method import PruningMethod  # the artifact's tag (re-exported: older imports name this module)
from .odp import ODPRule, ODPThresholds
from .otp import MaskPredictor, OTPRule

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class LayerShape(BaseModel):
    """What a pruning artifact assumes about one MoE layer."""

    model_config = ConfigDict(extra="forbid")

    index: int
    num_experts: int
    top_k: int


class OTPSettings(BaseModel):
    """OTP predictors' description (weights are in the safetensors file)."""

    model_config = ConfigDict(extra="forbid")

    width: int
    weights_file: str
    weights_sha256: str
    config: dict[str, Any] = Field(default_factory=dict)
    summary: dict[int, dict[str, float]] = Field(default_factory=dict)


class PruningArtifact(BaseModel):
    """One fitted pruning method for one model (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    method: PruningMethod
    model_type: str
    hidden_size: int
    moe_layers: list[LayerShape]  # every MoE layer of the model (the pruned ones are a subset)
    odp: ODPThresholds | None = None
    otp: OTPSettings | None = None
    _predictors: dict[int, MaskPredictor] = PrivateAttr(default_factory=dict)

    @property
    def predictors(self) -> dict[int, MaskPredictor]:
        return self._predictors

    @property
    def pruned_layers(self) -> list[int]:
        if self.method is PruningMethod.ODP:
            return sorted(self.odp.mu) if self.odp else []
        return sorted(self._predictors)


def _describe(iface: ExpertInterface) -> tuple[str, int, list[LayerShape]]:
    cfg = iface.adapter.text_config(iface.model)
    shapes = [LayerShape(index=la.index, num_experts=la.num_experts, top_k=la.top_k) for la in iface.layers]
    return str(getattr(cfg, "model_type", iface.adapter.name)), int(cfg.hidden_size), shapes


def odp_artifact(iface: ExpertInterface, thresholds: ODPThresholds) -> PruningArtifact:
    model_type, hidden, shapes = _describe(iface)
    return PruningArtifact(method=PruningMethod.ODP, model_type=model_type, hidden_size=hidden, moe_layers=shapes,
                           odp=thresholds)


def otp_artifact(iface: ExpertInterface, predictors: dict[int, MaskPredictor],
                 summary: dict[int, dict[str, float]] | None = None, config: dict[str, Any] | None = None
                 ) -> PruningArtifact:
    if not predictors:
        raise ValueError("no OTP predictors to store")
    model_type, hidden, shapes = _describe(iface)
    widths = {p.width for p in predictors.values()}
    if len(widths) != 1:
        raise ValueError(f"predictors of different widths {sorted(widths)} in one artifact")
    art = PruningArtifact(method=PruningMethod.OTP, model_type=model_type, hidden_size=hidden, moe_layers=shapes,
                          otp=OTPSettings(width=widths.pop(), weights_file="", weights_sha256="",
                                          config=dict(config or {}), summary=dict(summary or {})))
    art._predictors = dict(predictors)
    return art


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_pruning(artifact: PruningArtifact, path: str | os.PathLike[str]) -> Path:
    """Write ``path`` (JSON) and, for OTP, the predictors' safetensors beside it (same stem). Returns ``path``."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"pruning artifact path must end in .json, got {path}")
    art = artifact.model_copy(deep=True)
    art._predictors = artifact.predictors
    if art.method is PruningMethod.OTP:
        if not art.predictors or art.otp is None:
            raise ValueError("OTP artifact without predictors")
        st = path.with_suffix(".safetensors")
        tensors = {f"layers.{i}.{name}": t.detach().float().cpu()
                   for i, p in sorted(art.predictors.items()) for name, t in p.state_dict().items()}
        meta = {"format_version": str(FORMAT_VERSION), "top_k": ",".join(str(p.top_k) for _, p in
                                                                         sorted(art.predictors.items()))}
        save_safetensors_atomic(st, tensors, metadata=meta)
        art.otp.weights_file = st.name
        art.otp.weights_sha256 = _sha256(st)
    write_json_atomic(path, art.model_dump(mode="json"))
    log.info("wrote %s pruning artifact %s", art.method.value, path)
    return path


def load_pruning(path: str | os.PathLike[str]) -> PruningArtifact:
    """Read a pruning artifact (and the OTP predictors' weights), validating format and file integrity."""
    path = Path(path)
    data = read_json(path, what="pruning artifact")
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION or "method" not in data:
        raise ValueError(f"{path}: not a pruning artifact of format version {FORMAT_VERSION}")
    art = PruningArtifact.model_validate(data)
    if art.method is PruningMethod.ODP and art.odp is None:
        raise ValueError(f"{path}: ODP artifact without thresholds")
    if art.method is PruningMethod.OTP:
        if art.otp is None:
            raise ValueError(f"{path}: OTP artifact without predictor settings")
        st = path.parent / art.otp.weights_file
        if not st.is_file():
            raise FileNotFoundError(f"OTP predictor weights not found: {st} (referenced by {path})")
        if _sha256(st) != art.otp.weights_sha256:
            raise ValueError(f"{st} does not match the checksum recorded in {path}: the two files are out of sync")
        from safetensors.torch import load_file

        tensors = load_file(str(st))
        shapes = {ls.index: ls for ls in art.moe_layers}
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            _, idx, name = key.split(".", 2)
            by_layer.setdefault(int(idx), {})[name] = t
        for idx, sd in sorted(by_layer.items()):
            if idx not in shapes:
                raise ValueError(f"{st}: predictor for decoder layer {idx}, which the artifact lists as no MoE layer")
            pred = MaskPredictor(art.hidden_size, shapes[idx].top_k, art.otp.width)
            try:
                pred.load_state_dict(sd, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"{st}: layer {idx} predictor does not fit hidden size {art.hidden_size}, "
                                 f"top-{shapes[idx].top_k}, width {art.otp.width}: {exc}") from exc
            art._predictors[idx] = pred.eval().requires_grad_(False)
    return art


def check_compatible(iface: ExpertInterface, artifact: PruningArtifact) -> None:
    """Raise a clear error when ``artifact`` was fitted for a model of a different shape."""
    model_type, hidden, shapes = _describe(iface)
    problems = []
    if artifact.model_type != model_type:
        problems.append(f"model_type {artifact.model_type!r} vs the model's {model_type!r}")
    if artifact.hidden_size != hidden:
        problems.append(f"hidden size {artifact.hidden_size} vs the model's {hidden}")
    have = {s.index: s for s in shapes}
    want = {s.index: s for s in artifact.moe_layers}
    if sorted(have) != sorted(want):
        problems.append(f"MoE layers {sorted(want)} vs the model's {sorted(have)}")
    for idx in sorted(set(have) & set(want)):
        a, b = want[idx], have[idx]
        if (a.num_experts, a.top_k) != (b.num_experts, b.top_k):
            problems.append(f"layer {idx}: top-{a.top_k} of {a.num_experts} vs the model's top-{b.top_k} of "
                            f"{b.num_experts}")
    if problems:
        raise ValueError("pruning artifact does not fit this model: " + "; ".join(problems))


def apply_pruning(iface: ExpertInterface, artifact: PruningArtifact) -> ODPRule | OTPRule:
    """Install the artifact's routing override on ``iface`` (installing the interface if needed).

    Returns the installed rule; ``rule.remove()`` (or ``with``) takes it off again, and so does
    ``iface.uninstall()`` (attention capture included).
    """
    check_compatible(iface, artifact)
    if artifact.method is PruningMethod.ODP:
        assert artifact.odp is not None
        rule: ODPRule | OTPRule = ODPRule(iface, artifact.odp)
    else:
        rule = OTPRule(iface, artifact.predictors)
    rule.install()
    iface.on_uninstall(rule.remove)
    return rule
