"""``pmq+``: several candidate bit plans at the requested budget, the one with the lowest measured loss kept.

The paper's program (Eq. 4) ranks plans poorly on the embedded model (Spearman 0.03 against held-out perplexity over
13 plans at 2.0 bits), while the calibration loss measured after quantizing ranks them well (0.98). So ``pmq+``:

1. builds a small set of candidate plans with the ordinary allocators (:data:`CANDIDATES`, all at the same budget):
   the paper's PMQ per layer, PMQ with one global budget, the eps-only plan, the global program without the
   paper's width constraints, and the uniform plan where the target equals a width (no width constraints);
2. quantizes the experts once per width they need, cheaply (:func:`preview_experts`: GPTQ on each expert's
   Hessian from one layer-by-layer pass over the plan-building data, or round-to-nearest; starved experts always
   by round-to-nearest, the engine's declared fallback; other weights stay as they are, so they are the same for
   every candidate);
3. measures each distinct plan's next-token loss on a *selection* split of calibration data held apart from the
   plan-building data (never evaluation data) and keeps the lowest (ties: the earlier candidate);
4. writes the candidates, their losses and the choice into the plan (``BitPlan.selection``).

Every request is checked before any quantization: an unknown or unreachable requested candidate, or an empty
candidate set after the budget and the cap, is an :class:`AllocationError`.

::

    plan = allocate_plus(model, stats, fit_batches, select_batches,
                         AllocationConfig(method="pmq+", target_bits=2.0), PlusConfig(max_candidates=4),
                         adapter=get_adapter(model))     # the model family's adapter (model_adapters)

Cost: one forward pass of the plan-building data, GPTQ of every expert at each width some candidate uses (at
most ``len(bits)`` times the expert GPTQ of one quantization pass), and one forward pass of the selection split
per distinct candidate. The preview keeps every width's packed codes (``sum(bits)`` bits per expert weight).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from mcmoe_vl.calibration.stats import CalibrationStats
from mcmoe_vl.quant.plan import BitPlan

from .allocate import allocate
from .budget import AllocationError
from .config import AllocationConfig, Scope

log = logging.getLogger(__name__)

# name -> the AllocationConfig fields that make the candidate from the requested one (priority order = this order)
CANDIDATES: dict[str, dict[str, Any]] = {
    "pmq": {"method": "pmq", "scope": Scope.LAYER},  # the paper
    "pmq-global": {"method": "pmq", "scope": Scope.GLOBAL},
    "uniform": {"method": "uniform", "scope": Scope.LAYER, "require_widths": ()},
    "eps-global": {"method": "fnorm", "scope": Scope.GLOBAL},
    "pmq-global-free": {"method": "pmq", "scope": Scope.GLOBAL, "require_widths": ()},
    "eps": {"method": "fnorm", "scope": Scope.LAYER},
    "hessian-global": {"method": "hessian", "scope": Scope.GLOBAL},
}
DEFAULT_CANDIDATES = ("pmq", "pmq-global", "uniform", "eps-global", "pmq-global-free")
PREVIEWS = ("gptq", "rtn")


class PlusConfig(BaseModel):
    """Settings of ``pmq+`` beyond the allocation config.

    ``candidates``: names from :data:`CANDIDATES` (None: :data:`DEFAULT_CANDIDATES`, unreachable ones skipped; an
    explicit list must be reachable). ``max_candidates``: evaluate at most this many (in priority order).
    ``preview``: ``"gptq"`` or ``"rtn"``. ``refit_1bit``: the 1-bit scale refit in the preview and in the plan.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: tuple[str, ...] | None = None
    max_candidates: int | None = Field(None, ge=1)
    preview: str = "gptq"
    refit_1bit: bool = True
    damp: float = Field(0.01, gt=0)
    min_tokens: int = Field(16, ge=0)  # fewer plan-building tokens: round-to-nearest (the engine's rule)

    @field_validator("candidates")
    @classmethod
    def _names(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        bad = [n for n in v if n not in CANDIDATES]
        if bad:
            raise ValueError(f"unknown pmq+ candidates {bad}; valid: {', '.join(CANDIDATES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"pmq+ candidates repeat: {list(v)}")
        return v

    @field_validator("preview")
    @classmethod
    def _preview(cls, v: str) -> str:
        if v not in PREVIEWS:
            raise ValueError(f"unknown pmq+ preview {v!r}; valid: {', '.join(PREVIEWS)}")
        return v


@dataclass
class Candidate:
    name: str
    config: AllocationConfig
    plan: BitPlan
    loss: float | None = None
    same_as: str | None = None  # an earlier candidate with identical widths (measured once)

    def key(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(la.bits) for la in self.plan.layers)


# -- 1. candidates (no model, no quantization) --------------------------------------------------------------------
def candidate_config(config: AllocationConfig, name: str) -> AllocationConfig:
    """The allocation config of candidate ``name`` at ``config``'s budget."""
    return AllocationConfig.model_validate({**config.model_dump(), **CANDIDATES[name]})


def check_feasible_plus(layout: Mapping[int, int], config: AllocationConfig) -> None:
    """Preflight: some default candidate reaches the target on this MoE layout (decoder layer -> experts)."""
    from .allocate import check_feasible

    reasons = []
    for name in DEFAULT_CANDIDATES:
        try:
            return check_feasible(layout, candidate_config(config, name))
        except AllocationError as exc:
            reasons.append(f"{name}: {exc}")
    raise AllocationError(f"pmq+: no candidate plan reaches target {config.target_bits:g} {config.budget.value} "
                          f"bits ({'; '.join(reasons)})")


def build_candidates(stats: CalibrationStats, config: AllocationConfig, plus: PlusConfig
                     ) -> tuple[list[Candidate], dict[str, str]]:
    """The candidate plans at ``config``'s budget, and the skipped default candidates with the reason."""
    explicit = plus.candidates is not None
    names = list(plus.candidates if explicit else DEFAULT_CANDIDATES)
    if not names:
        raise AllocationError(f"pmq+: the candidate set is empty; valid candidates: {', '.join(CANDIDATES)}")
    out: list[Candidate] = []
    skipped: dict[str, str] = {}
    for name in names:
        if plus.max_candidates is not None and len(out) >= plus.max_candidates:
            skipped[name] = f"over max_candidates = {plus.max_candidates}"
            continue
        cfg = candidate_config(config, name)
        try:
            plan = allocate(stats, cfg)
        except AllocationError as exc:
            if explicit:
                raise AllocationError(f"pmq+: the requested candidate {name!r} cannot reach the budget: {exc}") from exc
            skipped[name] = str(exc)
            continue
        out.append(Candidate(name, cfg, plan))
    if not out:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise AllocationError(f"pmq+: no candidate plan reaches target {config.target_bits:g} "
                              f"{config.budget.value} bits ({reasons})")
    seen: dict[tuple, str] = {}
    for c in out:
        c.same_as = seen.setdefault(c.key(), c.name)
        if c.same_as == c.name:
            c.same_as = None
    return out, skipped


# -- 2. the preview: every expert quantized at every needed width -------------------------------------------------
@dataclass
class Preview:
    """Quantized experts per (decoder layer, expert, width), and how each expert was quantized."""

    modules: dict[tuple[int, int, int], nn.Module] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> plan-building tokens per expert
    starved: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts quantized by RTN
    seconds: float = 0.0


def preview_experts(model: nn.Module, fit_batches: Sequence[Mapping[str, Any]], widths: Mapping[int, set[int]],
                    plus: PlusConfig, *, group_size: int, adapter: Any) -> Preview:
    """Quantize each expert of each MoE layer at ``widths[layer]`` with the engine's ``quantize_weight``.

    Hessians come from one layer-by-layer pass over ``fit_batches`` with the original weights (the engine's own
    collector); each expert's inverse Hessians are factored once and shared by its widths. Experts with fewer than
    ``plus.min_tokens`` tokens, and all experts with ``preview="rtn"``, are quantized by round-to-nearest. Modules
    are the engine's packed :class:`QuantExpert` (codes at the true width). ``adapter``: the model family's.
    """
    from mcmoe_vl.moe.layerwise import iterate_layers
    from mcmoe_vl.quant.collect import ExpertCollector, ValidTokens, collect_layer
    from mcmoe_vl.quant.model import QuantizeConfig

    t0 = time.perf_counter()
    moe = {la.index: la for la in adapter.moe_layers(model)}
    cfg = QuantizeConfig(damp=plus.damp, refit_1bit=plus.refit_1bit, min_tokens=plus.min_tokens, progress=False)
    dtype = next(model.parameters()).dtype
    out = Preview()
    valid = ValidTokens()  # the engine's padding handling: Hessians and token counts over real tokens only
    for step in iterate_layers(model, fit_batches, adapter=adapter, progress=False):
        layer = moe.get(step.index)
        if layer is None:
            continue
        col = ExpertCollector(layer, torch.float32, valid)
        hook = layer.block.register_forward_pre_hook(col, with_kwargs=True)
        try:
            collect_layer(step, valid)
        finally:
            hook.remove()
        out.tokens[step.index] = list(col.tokens)
        out.starved[step.index] = [e for e, n in enumerate(col.tokens) if n < max(plus.min_tokens, 1)]
        for e in range(layer.num_experts):
            gptq = plus.preview == "gptq" and e not in out.starved[step.index]
            hs = (col.h_in[e].hessian(), col.h_down[e].hessian()) if gptq else None
            for bits, module in _preview_expert(layer, e, sorted(widths[step.index]), hs, cfg, group_size, dtype):
                out.modules[(step.index, e, bits)] = module
    out.seconds = time.perf_counter() - t0
    return out


def _preview_expert(layer: Any, e: int, widths: list[int], hessians: tuple[torch.Tensor, torch.Tensor] | None,
                    cfg: Any, group_size: int, dtype: torch.dtype) -> list[tuple[int, nn.Module]]:
    """Expert ``e`` at each width as a packed QuantExpert (GPTQ with these Hessians, or RTN when None)."""
    from mcmoe_vl.quant.gptq import prepare_inverse
    from mcmoe_vl.quant.model import quantize_weight
    from mcmoe_vl.quant.packed import PackedTensor
    from mcmoe_vl.quant.qlinear import QuantExpert, QuantLinear, Runtime, concat_rows

    w = layer.storage.weights(e)
    inv_in = inv_down = None
    if hessians is not None:
        inv_in, inv_down = (prepare_inverse(h, damp=cfg.damp, act_order=cfg.act_order) for h in hessians)
    out = []
    for bits in widths:
        packed = {k: PackedTensor.from_result(quantize_weight(m, bits, cfg, group_size=group_size, inv=inv))
                  for k, m, inv in (("gate", w.gate, inv_in), ("up", w.up, inv_in), ("down", w.down, inv_down))}
        mk = lambda p: QuantLinear(p, runtime=Runtime.PACKED, dtype=dtype)  # noqa: E731
        out.append((bits, QuantExpert(mk(packed["down"]), layer.storage.act_fn,
                                      gate_up=mk(concat_rows(packed["gate"], packed["up"])))))
    return out


# -- 3. measuring a plan ----------------------------------------------------------------------------------------------
@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[Mapping[str, Any]], adapter: Any) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over the valid tokens of ``batches``, and the number of tokens.

    A position counts when it and the next token are valid (``attention_mask``) and the next token is not an image
    token (the adapter's :meth:`~model_adapters.base.MoEAdapter.image_token_mask`, as in calibration; ``adapter``
    is the model family's). A batch with ``labels`` (the Hugging Face convention, -100 = ignored) is scored on its
    labels, e.g. only the answers of image questions."""
    total, n = 0.0, 0
    for b in batches:
        b = dict(b)
        image = adapter.image_token_mask(b)
        b.pop("image_token_mask", None)
        labels = b.pop("labels", None)
        b.setdefault("use_cache", False)
        ids = torch.as_tensor(b["input_ids"])
        logits = model(**b).logits[:, :-1].float()  # (B, S-1, V)
        mask = b.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        keep = valid[:, :-1] & valid[:, 1:]
        if image is not None:
            keep &= ~torch.as_tensor(image).bool()[:, 1:]
        target = ids[:, 1:]
        if labels is not None:
            target = torch.as_tensor(labels)[:, 1:]
            keep &= target != -100
            target = target.clamp_min(0)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, S-1)
        total += float(nll[keep].double().sum())
        n += int(keep.sum())
    if n == 0:
        raise AllocationError("pmq+: the selection data has no valid next-token positions")
    return total / n, n


def plan_loss(model: nn.Module, plan: BitPlan, preview: Preview, batches: Sequence[Mapping[str, Any]],
              *, adapter: Any) -> tuple[float, int]:
    """Calibration loss of ``model`` with every routed expert replaced by its preview at the plan's width."""
    from mcmoe_vl.moe.interface import ExpertInterface

    with ExpertInterface(model, adapter) as iface:
        for lp in plan.layers:
            layer = iface.layer(lp.index)
            for e, bits in enumerate(lp.bits):
                layer.set_expert(e, preview.modules[(lp.index, e, bits)])
        return calibration_loss(model, batches, iface.adapter)


# -- 4. the whole allocator ------------------------------------------------------------------------------------------
def _row_hashes(batches: Sequence[Mapping[str, Any]]) -> tuple[set[str], str]:
    """Per sequence, a hash of everything the batch holds for it (token ids, images, masks); and one of all."""
    rows: set[str] = set()
    h = hashlib.sha256()
    for b in batches:
        ids = torch.as_tensor(b["input_ids"]).to(torch.int64)
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.numpy().tobytes())
        per_row = [(k, v) for k, v in sorted(b.items())
                   if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == ids.shape[0]]
        for i in range(ids.shape[0]):
            r = hashlib.sha256()
            for k, v in per_row:
                r.update(k.encode())
                r.update(v[i].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # any dtype
            rows.add(r.hexdigest())
    return rows, h.hexdigest()


def check_held_apart(fit_batches: Sequence[Mapping[str, Any]], select_batches: Sequence[Mapping[str, Any]]
                     ) -> tuple[str, str]:
    """Both splits non-empty, no sequence in both; returns their fingerprints (sha256 of the token ids)."""
    if not fit_batches or not select_batches:
        raise AllocationError("pmq+ needs plan-building batches and selection batches (both non-empty)")
    fit_rows, fit_fp = _row_hashes(fit_batches)
    sel_rows, sel_fp = _row_hashes(select_batches)
    shared = len(fit_rows & sel_rows)
    if shared:
        raise AllocationError(f"pmq+: {shared} selection sequences also appear in the plan-building data; the "
                              "selection split must be held apart (and never be evaluation data)")
    return fit_fp, sel_fp


def _record(chosen: Candidate, candidates: list[Candidate], skipped: dict[str, str], plus: PlusConfig,
            preview: Preview, n_tokens: int, fingerprints: tuple[str, str], eval_s: float) -> dict[str, Any]:
    """What the plan file says about the selection (``BitPlan.selection``)."""
    return {
        "chosen": chosen.name,
        "loss": "mean next-token cross-entropy (nats) on the selection split, experts previewed",
        "preview": plus.preview, "refit_1bit": plus.refit_1bit, "min_tokens": plus.min_tokens,
        "candidates": [{"name": c.name, "method": c.config.method, "scope": c.config.scope.value,
                        "require_widths": list(c.config.required), "loss": c.loss, "same_as": c.same_as,
                        "achieved": dict(c.plan.achieved),
                        "layers": {str(la.index): la.nominal for la in c.plan.layers}}
                       for c in candidates],
        "skipped": skipped,
        "selection_tokens": n_tokens,
        "fit_fingerprint": fingerprints[0], "selection_fingerprint": fingerprints[1],
        "starved": {str(k): v for k, v in preview.starved.items() if v},
        "seconds": {"preview": round(preview.seconds, 3), "evaluation": round(eval_s, 3)},
        "settings": plus.model_dump(mode="json"),
    }


def allocate_plus(model: nn.Module, stats: CalibrationStats, fit_batches: Sequence[Mapping[str, Any]],
                  select_batches: Sequence[Mapping[str, Any]], config: AllocationConfig,
                  plus: PlusConfig | None = None, *, adapter: Any) -> BitPlan:
    """The ``pmq+`` plan (module docstring). ``fit_batches``: the plan-building calibration data (the data of
    ``stats``, also used by the preview's GPTQ); ``select_batches``: calibration data held apart from it;
    ``adapter``: the model family's (``model_adapters.get_adapter(model)``)."""
    plus = plus or PlusConfig()
    candidates, skipped = build_candidates(stats, config, plus)  # every request error before any quantization
    fit_fp, sel_fp = check_held_apart(fit_batches, select_batches)
    widths: dict[int, set[int]] = {}
    for c in candidates:
        for lp in c.plan.layers:
            widths.setdefault(lp.index, set()).update(lp.bits)
    preview = preview_experts(model, fit_batches, widths, plus, group_size=config.group_size, adapter=adapter)
    t0 = time.perf_counter()
    n_tokens = 0
    losses: dict[str, float] = {}
    for c in candidates:
        if c.same_as is None:
            losses[c.name], n_tokens = plan_loss(model, c.plan, preview, select_batches, adapter=adapter)
        c.loss = losses[c.same_as or c.name]
    eval_s = time.perf_counter() - t0
    chosen = min(candidates, key=lambda c: c.loss)  # min keeps the first of equal losses: priority order
    log.info("pmq+: chose %s (loss %.5f) among %s", chosen.name, chosen.loss,
             {c.name: round(c.loss, 5) for c in candidates})
    record = _record(chosen, candidates, skipped, plus, preview, n_tokens, (fit_fp, sel_fp), eval_s)
    return chosen.plan.model_copy(update={"allocator": "pmq+", "refit_1bit": plus.refit_1bit, "selection": record,
                                          "settings": {**chosen.plan.settings, "method": "pmq+",
                                                       "candidate_method": chosen.config.method}})
