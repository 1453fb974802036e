"""The stages of a suite run, each a thin call into the library that owns it.

- load: a model and tokenizer from a local directory or the Hub (``device_map="auto"`` shards over GPUs);
- calibration data: seeded token windows from the suite's calibration source;
- calibrate (:mod:`mcmoe_vl.calibration`), allocate (:mod:`mcmoe_vl.allocation`), quantize (:mod:`mcmoe_vl.quant`),
  prune (:mod:`mcmoe_vl.pruning`), measure (speed and activated parameters on a fixed prefill workload).

Only the optional lmms-eval may be missing: its evaluation raises :class:`StageUnavailable`, and the runner skips the
recipes that need it and says so in the report. Every other stage imports its library directly, so an import error
inside the project fails loudly instead of silently skipping recipes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.allocation.plus import PlusConfig
from mcmoe_vl.dtypes import DTYPES
from mcmoe_vl.evaluation.compression import ODPInfo, OTPInfo, QuantAccounting
from mcmoe_vl.pruning.odp import ODPConfig
from mcmoe_vl.pruning.otp import OTPConfig
from mcmoe_vl.quant.checkpoint import load_quantized as load_checkpoint, save_quantized
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.plan import BitPlan, load_plan
from mcmoe_vl.quant.qlinear import Runtime, set_runtime as switch_runtime

from model_adapters.base import MoEAdapter

from .recipe import PLUS_METHOD
from .schema import CalibrationSpec, ModelSpec

if TYPE_CHECKING:  # imported by the stages that use them (calibration and pruning load on first use)
    from mcmoe_vl.calibration.stats import CalibrationStats
    from mcmoe_vl.pruning.artifact import PruningArtifact

log = logging.getLogger(__name__)


class StageUnavailable(RuntimeError):
    """The optional lmms-eval is not installed, so image tasks cannot run (the message says why)."""


# -- models ----------------------------------------------------------------------------------------------------------
def load_model(spec: ModelSpec, location: str, is_local: bool, adapter: MoEAdapter) -> nn.Module:
    """The model in eval mode: local directories through the calibration loader (the adapter's
    :meth:`~model_adapters.base.MoEAdapter.load_model`), Hub ids and sharded loading through transformers'
    ``from_pretrained``, unless the adapter loads only local files (then the Hub snapshot is downloaded first)."""
    dtype = DTYPES[spec.dtype]
    if not adapter.hub_loadable:
        if spec.device_map is not None:
            raise ValueError(f"model {spec.name!r}: the {adapter.name} adapter loads on one device; remove "
                             "device_map")
        location, is_local = local_snapshot(spec, location), True
    if is_local and spec.device_map is None:
        from mcmoe_vl.calibration.workflow import load_model as load_local

        return load_local(location, dtype=dtype, device=spec.device)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
        if spec.max_memory:
            kwargs["max_memory"] = {(int(k) if k.isdigit() else k): v for k, v in spec.max_memory.items()}
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if spec.device_map is None:
        model = model.to(spec.device)
    return model.eval()


def local_snapshot(spec: ModelSpec, location: str) -> str:
    """A local directory for the checkpoint: itself, or the Hub snapshot (downloaded once, then cached)."""
    if Path(location).is_dir():
        return location
    from huggingface_hub import snapshot_download

    return snapshot_download(location, revision=spec.revision,
                             allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])


def load_tokenizer(spec: ModelSpec, location: str, adapter: MoEAdapter) -> Any:
    from transformers import AutoTokenizer

    if not adapter.hub_loadable and spec.tokenizer is None:
        location = local_snapshot(spec, location)
    src = spec.tokenizer or location
    try:
        return AutoTokenizer.from_pretrained(src, revision=spec.revision) if spec.revision else \
            AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model {spec.name!r}: no tokenizer at {src} ({exc}); set models.tokenizer") from exc


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- calibration data ------------------------------------------------------------------------------------------------
def source_text(data: str, *, base: Path | None = None, text_field: str = "text", max_chars: int = 50_000_000
                ) -> str:
    """The text of a calibration source: ``embedded:<split>``, a text file, or ``hf:<dataset>[:<config>[:<split>]]``."""
    if data.startswith("hf:"):
        from mcmoe_vl.data.hub import hub_text

        return hub_text(data, text_field=text_field, max_chars=max_chars)
    from mcmoe_vl.calibration.workflow import calibration_text

    if not data.startswith("embedded") and base is not None and not Path(data).is_absolute():
        data = str(base / data) if (base / data).exists() else data
    return calibration_text(data)


def token_windows(tokenizer: Any, text: str, *, seq_len: int, num: int, seed: int) -> torch.Tensor:
    from mcmoe_vl.calibration.data import token_windows as windows

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return windows(ids, seq_len, num, seed=seed)


def heldout_source(data: str) -> str:
    """Where the timing workload comes from: the held-out split for the embedded corpus, else the same source."""
    return "embedded:heldout" if data in ("embedded", "embedded:train") else data


def batches(ids: torch.Tensor, batch_size: int, device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    from mcmoe_vl.calibration.data import batches_from_ids

    return [{k: v.to(device) for k, v in b.items()} for b in batches_from_ids(ids, batch_size)]


def vlm_samples(data: str, *, split: str, num: int, seed: int, base: Path | None = None) -> list[Any]:
    """Image+text samples for a vision-language model: ``embedded:vqa`` (rendered offline image questions, every
    task in turn) or a JSONL file of ``{"text", "image", "answer"}`` (a seeded subset)."""
    import random

    from mcmoe_vl.calibration.image_text import ImageTextSample, load_image_text_samples

    if data == "embedded:vqa":
        from mcmoe_vl.data.images import VQATask, vqa_samples

        tasks = list(VQATask)
        per = -(-num // len(tasks))
        pools = [vqa_samples(t, split, per, seed=seed) for t in tasks]
        mixed = [pool[i] for i in range(per) for pool in pools if i < len(pool)][:num]
        return [ImageTextSample(text=s.question, images=[s.image], answer=s.answer) for s in mixed]
    p = Path(data)
    if base is not None and not p.is_absolute() and (base / p).exists():
        p = base / p
    samples = load_image_text_samples(p)
    rng = random.Random(seed if split == "train" else seed + 10_000)
    return rng.sample(samples, min(num, len(samples)))


def vlm_batches(adapter: MoEAdapter, processor: Any, samples: list[Any], batch_size: int,
                device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """The adapter's calibration batches of image+text samples, on ``device``."""
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
            for b in adapter.calibration_batches(processor, samples, batch_size)]


# -- calibrate / allocate --------------------------------------------------------------------------------------------
def calibrate(model: nn.Module, calib_batches: list[dict[str, Any]], spec: CalibrationSpec, *, group_size: int,
              output: Path, model_name: str, model_fingerprint: Any, progress: bool) -> CalibrationStats:
    """Calibrate into ``output``, continuing a partial file of the same weights, data and settings; a partial
    file that cannot be continued (truncated, edited, other weights) is removed and the pass starts over."""
    from mcmoe_vl.calibration.calibrate import CalibrationConfig, ResumeError, calibrate as run

    cfg = CalibrationConfig(eps_bits=tuple(spec.eps_bits), group_size=group_size, min_tokens=spec.min_tokens)
    kw = dict(output=output, model_name=model_name, model_fingerprint=model_fingerprint, progress=progress)
    try:
        return run(model, calib_batches, cfg, resume=True, **kw)
    except ResumeError as exc:
        log.warning("%s; starting the calibration over", exc)
        output.unlink(missing_ok=True)
        return run(model, calib_batches, cfg, resume=False, **kw)


def significance_plot(stats: CalibrationStats, path: Path) -> Path:
    from mcmoe_vl.plots import significance_heatmaps

    return significance_heatmaps(stats, path)


def allocate(stats: CalibrationStats, allocation: AllocationConfig, plus: PlusConfig | None, *, plan_path: Path,
             heatmap_path: Path, title: str, plus_data: Any = None, adapter: MoEAdapter | None = None) -> BitPlan:
    """The recipe's plan; ``pmq+`` also needs ``plus_data()`` -> (model, plan-building batches, selection batches)
    and the model's ``adapter``."""
    from mcmoe_vl.allocation.allocate import allocate as run
    from mcmoe_vl.plots import allocation_heatmap

    if allocation.method == PLUS_METHOD:
        assert plus is not None  # the recipe gives pmq+ its PlusConfig
        plan = allocate_plus(stats, allocation, plus, plus_data, adapter,
                             stats_path=plan_path.with_name("stats_gptq.json"))
    else:
        plan = run(stats, allocation)
    plan.save(plan_path)
    allocation_heatmap([lp.bits for lp in plan.layers], heatmap_path,
                       layer_labels=[str(lp.index) for lp in plan.layers], title=title)
    return plan


def allocate_plus(stats: CalibrationStats, allocation: AllocationConfig, plus: PlusConfig, plus_data: Any,
                  adapter: MoEAdapter | None, *, stats_path: Path) -> BitPlan:
    """pmq+: eps re-measured with GPTQ (and the 1-bit refit) on the same data, then candidates chosen by loss."""
    from mcmoe_vl.allocation.plus import allocate_plus as run, build_candidates
    from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate as measure

    build_candidates(stats, allocation, plus)  # a bad request fails before any model work
    model, fit, select = plus_data()
    cfg = CalibrationConfig(**{**stats.config, "quantizer": "gptq", "refit_1bit": plus.refit_1bit})
    stats_gptq = measure(model, fit, cfg, output=stats_path, model_name=stats.model_name, progress=False,
                         adapter=adapter)
    return run(model, stats_gptq, fit, select, allocation, plus, adapter=adapter)


# -- quantize --------------------------------------------------------------------------------------------------------
def quantize(model: nn.Module, plan_path: Path, calib_batches: list[dict[str, Any]], gptq: QuantizeConfig, *,
             group_size: int, out_dir: Path, progress: bool, adapter: MoEAdapter) -> QuantAccounting:
    """Quantize ``model`` in place to the plan with the recipe's GPTQ config and save the packed checkpoint in
    ``out_dir`` (``group_size``: the recipe's allocation group size, which the plan was made with).

    Returns the engine's accounting (nominal / effective bits, bytes on disk, resident bytes) plus the starved
    experts (round-to-nearest fallback).
    """
    plan = load_plan(plan_path)
    if plan.group_size != group_size:
        plan = plan.model_copy(update={"group_size": group_size})
    cfg = gptq.model_copy(update={"progress": progress})
    report = quantize_model(model, plan, calib_batches, cfg, adapter=adapter)
    acct = save_quantized(model, out_dir, plan=plan, report=report, config=cfg, adapter=adapter)
    return QuantAccounting.from_engine(acct, report.starved)


def set_runtime(model: nn.Module, runtime: str) -> int:
    """Switch the quantized modules of ``model`` to ``runtime`` (fake or packed); returns how many switched."""
    return switch_runtime(model, Runtime(runtime))


def load_quantized(model: nn.Module, ckpt_dir: Path, runtime: str, adapter: MoEAdapter) -> nn.Module:
    """The checkpoint loaded into ``model`` (an unquantized instance of the architecture) in ``runtime``."""
    return load_checkpoint(ckpt_dir, model=model, runtime=Runtime(runtime), adapter=adapter).eval()


# -- prune -----------------------------------------------------------------------------------------------------------
def fit_pruning(model: nn.Module, calib_batches: list[dict[str, Any]], config: ODPConfig | OTPConfig, *, out: Path,
                progress: bool, adapter: MoEAdapter) -> PruningArtifact:
    """Fit ODP thresholds or train OTP predictors on ``model`` (original or quantized) with the recipe's config
    (:func:`mcmoe_vl.pruning.workflow.fit_pruning`) and save the artifact."""
    from mcmoe_vl.pruning.artifact import save_pruning
    from mcmoe_vl.pruning.workflow import fit_pruning as fit

    odp, otp = (config, None) if isinstance(config, ODPConfig) else (None, config)
    art = fit(model, calib_batches, config.method, odp=odp, otp=otp, progress=progress, adapter=adapter)
    save_pruning(art, out)
    return art


def original_counts(model: nn.Module, adapter: MoEAdapter) -> tuple[dict[int, int], int]:
    """(parameters of one routed expert per MoE layer, parameters every token uses) of the original model."""
    from mcmoe_vl.moe import ExpertInterface
    from mcmoe_vl.pruning.accounting import always_active_params, routed_expert_params

    iface = ExpertInterface(model, adapter)
    return routed_expert_params(iface), always_active_params(iface)


def prune_summary(artifact: PruningArtifact, config: ODPConfig | OTPConfig) -> ODPInfo | OTPInfo:
    """Settings and fitted numbers of a pruning artifact for the compression block."""
    common = {"method": config.method, "prune_rate": config.prune_rate,
              "layers": list(config.layers) if config.layers is not None else None}
    if isinstance(config, ODPConfig):
        odp = artifact.odp
        return ODPInfo(**common, protect_ratio=config.protect_ratio, quantile=config.quantile, mu_fixed=config.mu,
                       mu={str(k): v for k, v in sorted(odp.mu.items())} if odp is not None else None,
                       calibration_pruned_fraction={str(k): v for k, v in
                                                    sorted(odp.calibration_pruned_fraction.items())}
                       if odp is not None else None)
    otp = artifact.otp
    return OTPInfo(**common, steps=config.steps, width=config.width,
                   summary={str(k): v for k, v in sorted(otp.summary.items())} if otp is not None else None)
