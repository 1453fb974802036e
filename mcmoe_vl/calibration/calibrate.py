"""The calibration pass: expert significance, Hessian traces, ODP ratio quantiles and eps, layer by layer.

::

    from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate

    stats = calibrate(model, batches, CalibrationConfig(eps_bits=(1, 2, 3)), output="runs/stats.json")

``batches``: dicts of model inputs (``input_ids``, ``attention_mask``, and for vision-language models the image
inputs), each optionally with ``image_token_mask`` (B, S) bool marking image tokens (removed before the call, used
to split the statistics by image and text tokens; the model's adapter may read it from the model's own inputs
instead, :meth:`model_adapters.base.MoEAdapter.image_token_mask`).
Tokens with ``attention_mask == 0`` are left out of every statistic.

Memory is bounded by one decoder layer's activations: :func:`mcmoe_vl.moe.layerwise.iterate_layers` runs the
decoder layers one at a time over cached inputs; while a MoE layer runs, an observer keeps its block inputs and
routing, the statistics and the eps table (:mod:`.eps`) are computed from them, and they are dropped before the
next layer. After each MoE layer the statistics file is rewritten atomically, so an interrupted run resumes at
the first unfinished layer (earlier layers are re-run only to rebuild the inputs).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from mcmoe_vl.moe.checks import check_finite_weights, weights_fingerprint
from mcmoe_vl.moe.interface import ExpertInterface
from mcmoe_vl.moe.layer import MoELayer
from mcmoe_vl.moe.layerwise import IMAGE_MASK_KEY, CapturedLayer, iterate_layers
from mcmoe_vl.quant.widths import check_widths

from .eps import CapturedBatch, expert_errors, gptq_quantizer, rtn_quantizer
from .significance import SignificanceAccumulator
from .stats import FORMAT_VERSION, CalibrationStats, LayerStats, load_stats, save_stats

log = logging.getLogger(__name__)

EPS_QUANTIZERS = ("rtn", "gptq")


class CalibrationConfig(BaseModel):
    """What the calibration pass measures.

    ``eps_bits``: widths of the eps table (empty: no eps, no HAWQ; frequencies, weights and Hessian traces only).
    ``min_tokens``: experts with fewer calibration tokens are listed as starved.
    ``quantizer``: what eps is measured with: ``"rtn"`` (round-to-nearest, the paper) or ``"gptq"`` (the
    quantization engine's GPTQ on each expert's own Hessian, starved experts by round-to-nearest, as the checkpoint
    will hold them; ``refit_1bit`` adds the 1-bit scale refit, ``damp`` is GPTQ's damping). Recorded in the file.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    eps_bits: tuple[int, ...] = (1, 2, 3)
    group_size: int = Field(128, ge=1)
    quantizer: str = "rtn"  # "rtn": round-to-nearest of mcmoe_vl.quant (METHOD.md section 2); "gptq"
    refit_1bit: bool = False  # with quantizer "gptq": the 1-bit scale refit
    damp: float = Field(0.01, gt=0)  # with quantizer "gptq"
    ratio_quantiles: tuple[float, ...] = (0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95)
    min_tokens: int = Field(16, ge=0)

    @field_validator("eps_bits")
    @classmethod
    def _bits(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(check_widths(v, where="eps widths"))))

    @field_validator("quantizer")
    @classmethod
    def _quantizer(cls, v: str) -> str:
        if v not in EPS_QUANTIZERS:
            raise ValueError(f"unknown eps quantizer {v!r}; valid: {', '.join(EPS_QUANTIZERS)}")
        return v

    @model_validator(mode="after")
    def _refit_needs_gptq(self) -> CalibrationConfig:
        if self.refit_1bit and self.quantizer != "gptq":
            raise ValueError("refit_1bit refits the scales for GPTQ's signs: it needs quantizer = 'gptq'")
        return self

    def eps_quantizer(self):
        """The quantizer eps is measured with (see the class docstring)."""
        if self.quantizer == "gptq":
            return gptq_quantizer(self.group_size, min_tokens=self.min_tokens, refit_1bit=self.refit_1bit,
                                  damp=self.damp)
        return rtn_quantizer(self.group_size)

    @field_validator("ratio_quantiles")
    @classmethod
    def _qs(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 <= q <= 1 for q in v) or 0.5 not in v:
            raise ValueError("ratio_quantiles must lie in [0, 1] and include 0.5 (ODP's median)")
        return tuple(sorted(set(v)))


def prepare_batches(batches: Iterable[Mapping[str, Any]], adapter: Any = None
                    ) -> tuple[list[dict[str, Any]], str | None]:
    """Each batch with its image-token mask (``adapter.image_token_mask``; without an adapter the batch's own
    ``image_token_mask``) under ``image_token_mask``, read by the layer cache (:mod:`mcmoe_vl.moe.layerwise`);
    fingerprint the token ids."""
    out: list[dict[str, Any]] = []
    h = hashlib.sha256()
    fingerprintable = True
    for b in batches:
        b = dict(b)
        image = adapter.image_token_mask(b) if adapter is not None else b.get(IMAGE_MASK_KEY)
        b.pop(IMAGE_MASK_KEY, None)
        ids = b.get("input_ids")
        if ids is None:
            fingerprintable = False
        else:
            t = torch.as_tensor(ids).cpu().contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).numpy().tobytes())
        if image is not None:
            h.update(torch.as_tensor(image).cpu().bool().numpy().tobytes())
        b[IMAGE_MASK_KEY] = image
        out.append(b)
    if not out:
        raise ValueError("no calibration batches were given")
    return out, (h.hexdigest() if fingerprintable else None)


def layer_statistics(layer: MoELayer, captured: CapturedLayer, config: CalibrationConfig, *, progress: bool = False
                     ) -> LayerStats:
    """One layer's statistics from its captured tokens: significance groups, ODP quantiles, traces, eps / HAWQ."""
    acc = SignificanceAccumulator(layer.num_experts, layer.top_k)
    for r, img in zip(captured.routing, captured.image, strict=True):
        acc.add(r.topk_idx, r.topk_prob, r.topk_weight, img)
    batches = [CapturedBatch(x, r.topk_idx, r.topk_weight) for x, r in zip(captured.tokens, captured.routing,
                                                                             strict=True)]
    all_, image, text = acc.groups()
    k, N = layer.top_k, all_.num_tokens
    if sum(all_.counts) != k * N:  # integer counts: exact by construction, checked anyway
        raise AssertionError(f"{layer.path}: counts sum to {sum(all_.counts)}, expected {k} x {N}")
    errs = expert_errors(
        batches, layer.expert_weights, layer.storage.act_fn, layer.num_experts, config.eps_bits,
        config.eps_quantizer(), progress=progress, desc=f"eps layer {layer.index}",
    )
    stats = LayerStats(
        index=layer.index,
        path=layer.path,
        num_experts=layer.num_experts,
        top_k=k,
        scoring=layer.spec.scoring.value,
        all=all_,
        image=image,
        text=text,
        hessian_trace_in=errs.hessian_trace_in,
        hessian_trace_mid=errs.hessian_trace_mid,
        odp_ratio=acc.ratio_quantiles(config.ratio_quantiles),
        eps={str(b): v for b, v in errs.eps.items()},
        hawq={str(b): v for b, v in errs.hawq.items()},
        weight_error={str(b): v for b, v in errs.weight_error.items()},
    )
    stats.starved = stats.starved_experts(config.min_tokens)
    return stats


class ResumeError(ValueError):
    """An existing statistics file that cannot be continued: unreadable, edited since it was written, or made
    with other weights, data or settings. The message names the file and what differs."""


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    config: CalibrationConfig | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    resume: bool = True,
    model_name: str | None = None,
    model_fingerprint: Any = None,
    progress: bool = True,
    adapter: Any = None,
) -> CalibrationStats:
    """Run the calibration pass over ``model`` and return (and, with ``output``, save) the statistics.

    With ``output`` and ``resume``, an existing file from the same model weights, data and config is continued:
    finished layers are kept and skipped. Anything else is a :class:`ResumeError` (delete the file or pass
    ``resume=False`` to start over): a file from other weights, data or config, an unreadable one, or one whose
    checksum shows it was edited. ``model_fingerprint`` identifies the weights (the checkpoint's file hashes,
    :func:`mcmoe_vl.io.checkpoint_fingerprint`); None hashes the weights in memory (when there is an ``output``).
    NaN or infinite weights are refused before any work, naming the layer and expert. ``adapter``: by default
    ``model_adapters.get_adapter(model)``.
    """
    config = config or CalibrationConfig()
    iface = ExpertInterface(model, _adapter_for(model, adapter))
    moe: dict[int, MoELayer] = {la.index: la for la in iface.layers}
    check_finite_weights(model, iface.layers)
    prepared, fingerprint = prepare_batches(batches, iface.adapter)
    fresh = _fresh_stats(model, iface, prepared, fingerprint, config, model_name=model_name,
                         model_fingerprint=model_fingerprint, hash_weights=output is not None)
    stats = fresh
    if output is not None and resume and Path(output).exists():
        stats = _resume(Path(output), fresh)
    done = {la.index for la in stats.layers}
    todo = [i for i in sorted(moe) if i not in done]
    if not todo:
        log.info("calibration statistics already complete in %s", output)
        return stats
    was_training = model.training
    model.eval()
    try:
        with iface:
            for step in iterate_layers(model, prepared, adapter=iface.adapter, start=todo[0], stop=todo[-1] + 1,
                                       progress="calibration" if progress else False):
                if step.index not in moe or step.index in done:
                    continue
                captured = step.capture(iface)
                with torch.no_grad():
                    stats.layers.append(layer_statistics(moe[step.index], captured, config, progress=progress))
                del captured
                if output is not None:
                    save_stats(stats, output)
    finally:
        model.train(was_training)
    return stats


def _fresh_stats(model: nn.Module, iface: ExpertInterface, prepared: list, fingerprint: str | None,
                 config: CalibrationConfig, *, model_name: str | None, model_fingerprint: Any,
                 hash_weights: bool) -> CalibrationStats:
    """The statistics before any layer: what they were made from (weights, data, config) and the layer layout."""
    return CalibrationStats(
        format_version=FORMAT_VERSION,
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        model_name=model_name,
        num_decoder_layers=len(iface.adapter.decoder_layers(model)),
        moe_layer_indices=sorted(la.index for la in iface.layers),
        num_sequences=sum(int(torch.as_tensor(b["input_ids"]).shape[0]) if "input_ids" in b else 1
                          for b in prepared),
        data_fingerprint=fingerprint,
        # without a file to resume from, the (costly for large models) hash of the weights in memory is not needed
        model_fingerprint=model_fingerprint if model_fingerprint is not None or not hash_weights
        else weights_fingerprint(model),
        config=config.model_dump(mode="json"),
    )


def _adapter_for(model: nn.Module, adapter: Any) -> Any:
    if adapter is not None:
        return adapter
    from model_adapters import get_adapter

    return get_adapter(model)


def _resume(path: Path, fresh: CalibrationStats) -> CalibrationStats:
    try:
        old = load_stats(path, verify=True)
    except ValueError as exc:  # unreadable, truncated, edited, or values out of range
        raise ResumeError(f"cannot resume from {path}: {exc}; delete it or run without resume to start over") \
            from None
    for field_name in ("model_type", "num_decoder_layers", "moe_layer_indices", "model_fingerprint",
                       "data_fingerprint", "config"):
        a, b = getattr(old, field_name), getattr(fresh, field_name)
        if a != b:
            if field_name == "model_fingerprint":
                what = "no record of its weights (an older file)" if a is None else "different weights"
            else:
                what = f"a different {field_name} ({a!r} vs now {b!r})"
            raise ResumeError(f"{path} was made with {what}; delete it or run without resume to start over")
    log.info("resuming calibration from %s: %d of %d MoE layers done", path, len(old.layers),
             len(old.moe_layer_indices))
    return old
