"""One call from Python: calibrate, allocate, quantize (and optionally fit pruning) a MoE model.

::

    import mcmoe_vl
    cm = mcmoe_vl.compress("embedded/mixtral-tiny", "embedded:train", target_bits=2.5)
    cm.accounting.summary()            # nominal / effective bits, resident bytes (bytes on disk after save)
    cm.save("runs/mixtral-2.5b")       # a Hugging Face directory: from_pretrained loads it after import mcmoe_vl
    cm.evaluate(["mcmoe_docstring_cloze"], limit=50)

The pipeline is the paper's (METHOD.md sections 1-4): significance statistics and the eps table on the calibration
data, the allocator's bit plan at ``target_bits``, GPTQ into packed storage. Every stage is a library function that
can also be called by itself (:func:`mcmoe_vl.calibration.calibrate.calibrate`,
:func:`mcmoe_vl.allocation.allocate.allocate`, :func:`mcmoe_vl.quant.model.quantize_model`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PRUNE_METHODS = ("odp", "otp")


@dataclass
class CompressedModel:
    """The result of :func:`compress`: the quantized model in memory and everything it was made from."""

    model: nn.Module
    plan: Any  # the BitPlan the engine quantized to (the allocator's, or the one passed in)
    report: Any  # QuantReport (starved experts, widths per module)
    stats: Any | None  # CalibrationStats
    tokenizer: Any | None = None
    source_dir: Path | None = None
    pruning: Any | None = None  # PruningArtifact, applied to ``model``
    quantize_config: Any | None = None
    saved_to: Path | None = None
    _accounting: Any | None = field(default=None, repr=False)

    @property
    def accounting(self) -> Any:
        """Bits and bytes (:class:`mcmoe_vl.quant.accounting.Accounting`); bytes on disk are measured by
        :meth:`save` and are None before it."""
        if self._accounting is None:
            from model_adapters import get_adapter

            from mcmoe_vl.quant.accounting import build_accounting, resident_bytes
            from mcmoe_vl.quant.checkpoint import account_model

            self._accounting = build_accounting(account_model(self.model, get_adapter(self.model)),
                                                resident_bytes=resident_bytes(self.model))
        return self._accounting

    def save(self, out_dir: str | os.PathLike[str]) -> Any:
        """Write the checkpoint directory (and ``pruning.json`` when pruning was fitted); returns the accounting."""
        from mcmoe_vl.quant.checkpoint import PRUNING_FILE, save_quantized

        self._accounting = save_quantized(self.model, out_dir, plan=self.plan, report=self.report,
                                          config=self.quantize_config, adapter=_adapter(self.model),
                                          source_dir=self.source_dir)
        if self.pruning is not None:
            from mcmoe_vl.pruning.artifact import save_pruning

            save_pruning(self.pruning, Path(out_dir) / PRUNING_FILE)
        self.saved_to = Path(out_dir)
        return self._accounting

    def evaluate(self, tasks: Sequence[str], *, limit: int | None = None, num_fewshot: int | None = None,
                 include_paths: Sequence[str | os.PathLike[str]] | None = None, batch_size: int = 8,
                 seed: int = 0, bootstrap_iters: int = 100) -> dict[str, Any]:
        """lm-eval ``tasks`` on the compressed model in memory (the project's offline tasks in ``tasks/lm_eval``
        are found by default); returns lm-eval's output (``results[task]["acc,none"]`` and its ``_stderr``)."""
        from mcmoe_vl.evaluation.lm_eval_backend import TaskRequest, evaluate_lm_eval

        if self.tokenizer is None:
            raise ValueError("evaluate needs a tokenizer: pass compress(..., tokenizer=...) or a model directory "
                             "that has one")
        reqs = [TaskRequest(name=t, num_fewshot=num_fewshot, limit=limit) for t in tasks]
        paths = include_paths if include_paths is not None else [default_task_dir()]
        return evaluate_lm_eval(self.model, self.tokenizer, reqs, include_paths=paths, batch_size=batch_size,
                                seed=seed, bootstrap_iters=bootstrap_iters)


def default_task_dir() -> Path:
    """The project's offline lm-eval tasks (``tasks/lm_eval`` in the repository)."""
    return Path(__file__).resolve().parent.parent / "tasks" / "lm_eval"


def compress(
    model_or_path: nn.Module | str | os.PathLike[str],
    data: Sequence[str] | str | torch.Tensor | Sequence[Sequence[int]],
    *,
    target_bits: float = 2.5,
    allocator: str = "pmq",
    plan: Any | None = None,
    prune: str | Any | None = None,
    tokenizer: Any | None = None,
    num_sequences: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    calibration: Any | None = None,
    allocation: Any | None = None,
    quantize: Any | None = None,
) -> CompressedModel:
    """Compress a MoE model with PMQ (and optionally ODP/OTP) in one call; see the module docstring.

    ``model_or_path``: a model instance or a local model directory. ``data``: a list of strings, a dataset name
    (``embedded:train``, ``hf:<dataset>[:<config>[:<split>]]``, or a text / token-ids file), or token ids (an
    (N, S) tensor or a list of lists). ``allocator``: any registered allocator (``pmq``, the paper's, by default;
    ``pmq+`` where installed, with a quarter of the sequences held apart from the statistics for its selection);
    ``plan``: a plan to use instead (a :class:`~mcmoe_vl.quant.plan.BitPlan`, its JSON as a dict, or a plan
    file). ``prune``: None, ``"odp"``, ``"otp"``, or an ``ODPConfig`` / ``OTPConfig``.
    ``calibration`` / ``allocation`` / ``quantize``: the stages' configs for anything not named here.
    """
    given_plan = _given_plan(plan) if plan is not None else None  # bad plans fail before any work
    alloc_cfg = None if given_plan is not None else _allocation_config(allocator, target_bits, allocation)
    prune_method = _prune_method(prune)
    source = Path(model_or_path) if not isinstance(model_or_path, nn.Module) else None
    if source is not None and tokenizer is None:
        tokenizer = _tokenizer(source)
    ids = _token_ids(data, tokenizer, source, num_sequences=num_sequences, seq_len=seq_len, seed=seed)
    model = _model(model_or_path, dtype)
    adapter = _adapter(model)  # the model family's adapter, resolved once for every stage
    if tokenizer is None:
        tokenizer = _tokenizer(_source_of(model))
    _check_ids(ids, model)
    batches = [{"input_ids": row[None]} for row in ids]
    stats, used_plan = None, given_plan
    if used_plan is None:
        fit, select = _held_apart(batches, alloc_cfg)
        stats = _calibrate(model, fit, calibration, adapter)
        used_plan = _allocate(model, stats, fit, select, alloc_cfg, adapter)
    report = _quantize(model, used_plan, batches, quantize, adapter)
    art = _fit_pruning(model, batches, prune, prune_method, adapter) if prune_method else None
    return CompressedModel(model=model, plan=used_plan, report=report, stats=stats,
                           tokenizer=tokenizer, source_dir=source or _source_of(model), pruning=art,
                           quantize_config=quantize)


# -- inputs ----------------------------------------------------------------------------------------------------------
def _allocation_config(allocator: str, target_bits: float, allocation: Any | None) -> Any:
    from mcmoe_vl.allocation.allocators import ALLOCATORS
    from mcmoe_vl.allocation.config import AllocationConfig

    ALLOCATORS.get(allocator)  # an unknown name fails here, with the registered names and close matches
    base = allocation.model_dump() if allocation is not None else {}
    return AllocationConfig(**{**base, "method": allocator, "target_bits": target_bits})


def _given_plan(plan: Any) -> Any:
    """The plan passed to :func:`compress`: a BitPlan as it is, its JSON (a dict) or a plan file read."""
    from mcmoe_vl.quant.plan import check_plan_type, load_plan, plan_from_dict

    if isinstance(plan, dict):
        return plan_from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    return check_plan_type(plan)


def _prune_method(prune: Any) -> str | None:
    if prune is None:
        return None
    from mcmoe_vl.pruning.odp import ODPConfig
    from mcmoe_vl.pruning.otp import OTPConfig

    if isinstance(prune, ODPConfig):
        return "odp"
    if isinstance(prune, OTPConfig):
        return "otp"
    if isinstance(prune, str) and prune in PRUNE_METHODS:
        return prune
    raise ValueError(f"prune={prune!r}; valid: None, {', '.join(map(repr, PRUNE_METHODS))}, an ODPConfig or an "
                     "OTPConfig")


def _source_of(model: nn.Module) -> Path | None:
    from mcmoe_vl.quant.checkpoint import model_source_dir

    return model_source_dir(model)


def _tokenizer(source: Path | None) -> Any | None:
    if source is None or not (source / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def _token_ids(data: Any, tokenizer: Any, source: Path | None, *, num_sequences: int, seq_len: int,
               seed: int) -> torch.Tensor:
    """(N, S) int64 calibration ids from any accepted form of ``data``."""
    from mcmoe_vl.calibration.data import load_token_ids, token_windows

    if isinstance(data, torch.Tensor) or _is_id_rows(data):
        ids = data if isinstance(data, torch.Tensor) else torch.tensor([list(r) for r in data])
        if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool or ids.numel() == 0:
            raise ValueError(f"token ids must be a non-empty (N, S) integer tensor or list of lists, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        return ids.to(torch.int64)[:num_sequences]
    if isinstance(data, str) and Path(data).suffix in (".json", ".safetensors") and Path(data).is_file():
        return load_token_ids(data)[:num_sequences]
    text = _text(data)
    if tokenizer is None:
        raise ValueError("text calibration data needs a tokenizer: pass tokenizer=..., a model directory that has "
                         "one, or token ids")
    if source is not None:
        from mcmoe_vl.calibration.limits import clamp_seq_len

        seq_len = clamp_seq_len(source, seq_len)
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    return token_windows(stream, seq_len, num_sequences, seed=seed)


def _is_id_rows(data: Any) -> bool:
    """A non-empty list of equal-length lists of ints."""
    return (isinstance(data, Sequence) and not isinstance(data, str) and bool(data)
            and all(isinstance(r, Sequence) and not isinstance(r, str) and r
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in r) for r in data))


def _text(data: Any) -> str:
    if isinstance(data, str):
        from mcmoe_vl.calibration.workflow import calibration_text

        return calibration_text(data)
    if isinstance(data, Sequence) and data and all(isinstance(t, str) for t in data):
        return "\n\n".join(data)
    raise ValueError(f"data must be a list of strings, a dataset name (embedded:<split>, hf:<dataset>, a file) or "
                     f"token ids; got {type(data).__name__}")


def _model(model_or_path: Any, dtype: torch.dtype) -> nn.Module:
    if isinstance(model_or_path, nn.Module):
        return model_or_path.eval()
    from mcmoe_vl.calibration.workflow import load_model

    return load_model(model_or_path, dtype=dtype)


def _check_ids(ids: torch.Tensor, model: nn.Module) -> None:
    cfg = getattr(model.config, "text_config", None) or model.config
    vocab, limit = getattr(cfg, "vocab_size", None), getattr(cfg, "max_position_embeddings", None)
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocabulary); got {int(ids.min())}.."
                         f"{int(ids.max())}")
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"sequences of {ids.shape[1]} tokens exceed the model's maximum of {limit} positions")


# -- stages ----------------------------------------------------------------------------------------------------------
def _adapter(model: nn.Module) -> Any:
    from model_adapters import get_adapter

    return get_adapter(model)


def _calibrate(model: nn.Module, batches: list[dict], calibration: Any | None, adapter: Any) -> Any:
    from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate

    return calibrate(model, batches, calibration or CalibrationConfig(), progress=False, adapter=adapter)


def _held_apart(batches: list[dict], config: Any) -> tuple[list[dict], list[dict]]:
    """(statistics batches, selection batches): ``pmq+`` chooses among candidate plans by calibration loss on
    sequences the statistics never saw, the last quarter (at least one); other allocators use every sequence."""
    if config.method != "pmq+":
        return batches, []
    if len(batches) < 2:
        raise ValueError("pmq+ needs at least 2 calibration sequences (a quarter is held apart for the selection)")
    n_sel = max(1, len(batches) // 4)
    return batches[:-n_sel], batches[-n_sel:]


def _allocate(model: nn.Module, stats: Any, fit: list[dict], select: list[dict], config: Any, adapter: Any) -> Any:
    if config.method != "pmq+":
        from mcmoe_vl.allocation.allocate import allocate

        return allocate(stats, config)
    try:
        from mcmoe_vl.allocation.plus import allocate_plus
    except ImportError as exc:
        raise ValueError(f"allocator 'pmq+' is registered but its implementation is missing ({exc})") from None
    return allocate_plus(model, stats, fit, select, config, adapter=adapter)


def _quantize(model: nn.Module, plan: Any, batches: list[dict], quantize: Any | None, adapter: Any) -> Any:
    from mcmoe_vl.quant.model import QuantizeConfig, quantize_model

    return quantize_model(model, plan, batches, quantize or QuantizeConfig(progress=False), adapter=adapter)


def _fit_pruning(model: nn.Module, batches: list[dict], prune: Any, method: str, adapter: Any) -> Any:
    from mcmoe_vl.moe.interface import ExpertInterface
    from mcmoe_vl.pruning.artifact import PruningMethod, apply_pruning
    from mcmoe_vl.pruning.workflow import fit_pruning

    kw = {} if isinstance(prune, str) else {method: prune}
    art = fit_pruning(model, batches, PruningMethod(method), progress=False, adapter=adapter, **kw)
    apply_pruning(ExpertInterface(model, adapter), art)
    return art
