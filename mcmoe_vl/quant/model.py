"""Quantize a whole model layer by layer, through the common expert interface.

For every decoder layer (``mcmoe_vl.moe.layerwise.iterate_layers``: one layer's activations in memory at a time):

1. One forward of the layer, with its original weights, on every calibration batch collects, over the batch's
   real tokens only (``attention_mask == 1``: left-padded VLM batches must not put padding into any Hessian, as the
   significance statistics and eps leave it out too)
   - a Hessian per ``nn.Linear`` of the layer (attention, shared experts, dense MLPs) and per router weight,
   - per routed expert, the Hessian of the tokens routed to it (``H = 2 X^T X / n`` over those tokens; gate and up
     share it) and that of the down projection's input ``act(gate x) * up x``.
2. Each weight is quantized at its width (experts: the plan's; others: ``default_bits`` or an override) with GPTQ;
   experts that received fewer than ``min_tokens`` tokens fall back to round-to-nearest and are recorded.
3. The quantized modules replace the originals (``nn.Linear`` -> :class:`QuantLinear`; a fused experts module ->
   :class:`QuantExperts`; a router weight is replaced by its dequantised values), and the layer is run again so
   the next layer is calibrated on the outputs of the quantized one.

Linear layers outside the decoder layers (``lm_head``, a vision tower) stay 16-bit by default (the plan's
``keep_16bit``); if the plan gives them a width they are quantized by round-to-nearest (no Hessian is collected).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from mcmoe_vl.moe.checks import check_finite_weights
from mcmoe_vl.moe.layer import MoELayer
from mcmoe_vl.moe.layerwise import LayerStep
from mcmoe_vl.moe.storage import ExpertWeights, FusedExpertStorage, ModuleListExpertStorage

from .collect import ExpertCollector, ValidTokens, collect_layer
from .gptq import HessianAccumulator, QuantResult, gptq_quantize, prepare_inverse, rtn_quantize
from .packed import PackedTensor
from .plan import BitPlan, PlanError, check_plan_type
from .qlinear import DenseExpert, QuantExpert, QuantExperts, QuantLinear, Runtime, concat_rows
from .quantizer import get_quantizer

log = logging.getLogger(__name__)


class HessianDtype(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def torch(self) -> torch.dtype:
        return torch.float32 if self is HessianDtype.FLOAT32 else torch.float64


class ModelDtype(str, enum.Enum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)


class QuantizeConfig(BaseModel):
    """Engine settings (the widths come from the plan). Example: ``QuantizeConfig(act_order=True)``."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0)
    act_order: bool = False
    static_groups: bool = False  # with act_order: group parameters from the unquantized weight, natural storage
    range_search: bool = False
    min_tokens: int = Field(16, ge=0)  # experts routed fewer calibration tokens fall back to round-to-nearest
    hessian_dtype: HessianDtype = HessianDtype.FLOAT32
    runtime: Runtime = Runtime.PACKED
    dtype: ModelDtype | None = None  # compute dtype of quantized modules; None = the model's parameter dtype
    quantize_router: bool = True  # the router weight at the plan's default width (stored dequantised)
    # 1-bit scales re-solved by Hessian-weighted least squares after GPTQ (quantizer.refit_binary_scales).
    # None: as the plan says (its refit_1bit, set by the pmq+ allocator), else off (the paper).
    refit_1bit: bool | None = None
    progress: bool = True


class ExpertRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: int
    tokens: int
    method: str  # "gptq", "rtn" (starved) or "dense" (16-bit)


class LayerRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    path: str
    experts: list[ExpertRecord]

    @property
    def starved(self) -> list[int]:
        return [i for i, e in enumerate(self.experts) if e.method == "rtn"]


class QuantReport(BaseModel):
    """What was quantized how: per MoE layer the experts' widths, tokens and method; widths of other modules."""

    model_config = ConfigDict(extra="forbid")

    layers: list[LayerRecord] = Field(default_factory=list)
    modules: dict[str, int] = Field(default_factory=dict)  # full name -> width (16 = kept)
    module_methods: dict[str, str] = Field(default_factory=dict)  # full name -> gptq / rtn / dense
    routers: dict[str, int] = Field(default_factory=dict)  # router weights quantized in place -> width

    @property
    def starved(self) -> dict[int, list[int]]:
        return {la.index: la.starved for la in self.layers if la.starved}


# -- one weight ---------------------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, bits: int, cfg: QuantizeConfig, *, group_size: int,
                    inv: Any = None) -> QuantResult:
    """GPTQ with a prepared inverse, or round-to-nearest when ``inv`` is None."""
    quant = get_quantizer(bits, range_search=cfg.range_search, refit_1bit=bool(cfg.refit_1bit))
    if inv is None:
        return rtn_quantize(w, quant, group_size=group_size)
    return gptq_quantize(w, inv, quant, group_size=group_size, block_size=cfg.block_size,
                         static_groups=cfg.static_groups)


def quantize_expert(weights: ExpertWeights, bits: int, cfg: QuantizeConfig, *, group_size: int,
                    h_in: torch.Tensor | None, h_down: torch.Tensor | None) -> dict[str, QuantResult]:
    """Quantize one expert's gate / up / down; gate and up share one inverse Hessian. No Hessian -> RTN."""
    inv_in = None if h_in is None else prepare_inverse(h_in, damp=cfg.damp, act_order=cfg.act_order)
    inv_down = None if h_down is None else prepare_inverse(h_down, damp=cfg.damp, act_order=cfg.act_order)
    return {
        "gate": quantize_weight(weights.gate, bits, cfg, group_size=group_size, inv=inv_in),
        "up": quantize_weight(weights.up, bits, cfg, group_size=group_size, inv=inv_in),
        "down": quantize_weight(weights.down, bits, cfg, group_size=group_size, inv=inv_down),
    }


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _router_module(adapter: Any, layer: MoELayer) -> nn.Module | None:
    return getattr(layer.block, getattr(adapter, "router_attr", "gate"), None)


def _experts_module_name(model: nn.Module, layer: MoELayer) -> str:
    target = layer.storage.module
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise RuntimeError(f"{layer.path}: the experts module is not part of the model")


# -- the whole model ------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What every layer of one :func:`quantize_model` call shares."""

    model: nn.Module
    plan: BitPlan
    cfg: QuantizeConfig
    adapter: Any
    dtype: torch.dtype  # of the quantized modules' outputs
    names: dict[nn.Module, str]  # module -> qualified name
    report: QuantReport = field(default_factory=QuantReport)
    done: set[str] = field(default_factory=set)  # linears already given their width (inside decoder layers)
    valid: ValidTokens = field(default_factory=ValidTokens)

    def linear(self, name: str, mod: nn.Linear, bits: int, inv: torch.Tensor | None) -> None:
        """Replace the linear ``name`` by its packed ``bits``-wide GPTQ (``inv`` given) or RTN quantization."""
        res = quantize_weight(mod.weight.data, bits, self.cfg, group_size=self.plan.group_size, inv=inv)
        self.report.module_methods[name] = "gptq" if inv is not None else "rtn"
        _set_module(self.model, name, QuantLinear(PackedTensor.from_result(res), mod.bias, runtime=self.cfg.runtime,
                                                  dtype=self.dtype))


def quantize_model(
    model: nn.Module,
    plan: BitPlan,
    batches: Iterable[Mapping[str, Any]],
    config: QuantizeConfig | None = None,
    *,
    adapter: Any | None = None,
    extras_key: str | None = None,
) -> QuantReport:
    """Quantize ``model`` in place to ``plan`` with calibration ``batches`` (dicts of model inputs).

    Returns a :class:`QuantReport`. Afterwards the model holds :class:`QuantLinear` / :class:`QuantExperts`
    modules in ``config.runtime`` and can be saved with :func:`mcmoe_vl.quant.checkpoint.save_quantized`.
    ``plan``: the allocator's :class:`~mcmoe_vl.quant.plan.BitPlan`, or a hand-written one
    (:func:`~mcmoe_vl.quant.plan.load_plan` reads a file). ``adapter``: the model family's
    (``model_adapters.get_adapter(model)``), resolved once by the caller.
    """
    check_plan_type(plan)  # before anything reads the plan
    from mcmoe_vl.moe.layerwise import iterate_layers

    cfg = config or QuantizeConfig()
    if cfg.refit_1bit is None:
        cfg = cfg.model_copy(update={"refit_1bit": plan.refit_1bit})
    if cfg.static_groups and not cfg.act_order:
        log.info("static_groups without act_order changes nothing")
    if adapter is None:
        raise TypeError("quantize_model needs the model family's adapter: pass adapter=model_adapters.get_adapter(model)")
    moe_layers = _checked_moe_layers(model, plan, adapter)
    dtype = cfg.dtype.torch if cfg.dtype is not None else next(model.parameters()).dtype
    run = _Run(model, plan, cfg, adapter, dtype, {m: n for n, m in model.named_modules()})

    prepared = [{k: v for k, v in b.items() if k != extras_key} for b in batches] if extras_key else batches
    for step in iterate_layers(model, prepared, adapter=adapter, progress=cfg.progress):
        _quantize_layer(run, step, moe_layers.get(step.index))
        step.run()  # quantized layer: inputs of the next one

    # linears outside the decoder layers (lm_head, vision, ...): RTN if the plan asks for a width
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name not in run.done:
            bits = plan.module_bits(name)
            if bits < 16:
                run.linear(name, mod, bits, None)
                run.report.modules[name] = bits
    n_starved = sum(len(v) for v in run.report.starved.values())
    if n_starved:
        log.warning("%d experts had %s and were quantized by round-to-nearest: %s", n_starved,
                    _starved_phrase(cfg.min_tokens), run.report.starved)
    return run.report


def _checked_moe_layers(model: nn.Module, plan: BitPlan, adapter: Any) -> dict[int, MoELayer]:
    """The model's MoE layers by decoder index, after checking that the plan, the weights and the expert storage
    can be quantized (before any long work)."""
    moe_layers = {la.index: la for la in adapter.moe_layers(model)}
    plan.check_layers({i: la.num_experts for i, la in moe_layers.items()})
    check_finite_weights(model, moe_layers.values())  # a NaN expert is named here, not by a Cholesky failure
    for la in moe_layers.values():
        if not isinstance(la.storage, (FusedExpertStorage, ModuleListExpertStorage)):
            raise PlanError(f"{la.path}: expert storage {type(la.storage).__name__} is not supported "
                            "(supported: fused 3-D tensors, or a module list of gate/up/down Linears)")
    return moe_layers


def _layer_targets(run: _Run, step: LayerStep, moe: MoELayer | None) -> dict[str, tuple[nn.Module, int]]:
    """The linears of this decoder layer outside the routed experts (attention, shared experts, dense MLPs) that
    the plan quantizes, with their widths; every one of them is recorded in the report."""
    experts_mod = moe.storage.module if moe is not None else None
    expert_linears = {id(m) for m in experts_mod.modules()} if experts_mod is not None else set()
    shared = moe.shared_experts if moe is not None else None
    shared_ids = {id(m) for m in shared.modules()} if shared is not None else set()
    targets: dict[str, tuple[nn.Module, int]] = {}
    for mod in step.layer.modules():
        if isinstance(mod, nn.Linear) and id(mod) not in expert_linears:
            name = run.names[mod]
            bits = run.plan.module_bits(name, shared_expert=id(mod) in shared_ids)
            run.report.modules[name] = bits
            run.done.add(name)
            if bits < 16:
                targets[name] = (mod, bits)
    return targets


def _router_bits(run: _Run, router: nn.Module | None) -> int:
    """The width of a router weight that is not an ``nn.Linear`` (16: left alone)."""
    if router is not None and not isinstance(router, nn.Linear) and run.cfg.quantize_router:
        rw = getattr(router, "weight", None)
        if isinstance(rw, torch.Tensor) and rw.dim() == 2:
            return run.plan.module_bits(run.names[router])
    return 16


def _quantize_layer(run: _Run, step: LayerStep, moe: MoELayer | None) -> None:
    """Collect this layer's Hessians over the real tokens with its original weights, then quantize its linears,
    its router weight and its routed experts."""
    targets = _layer_targets(run, step, moe)
    router = _router_module(run.adapter, moe) if moe is not None else None
    router_bits = _router_bits(run, router)
    hdt = run.cfg.hessian_dtype.torch
    accs: dict[str, HessianAccumulator] = {}
    valid = run.valid

    def make_hook(key: str, cols: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if valid.rerouting:  # the expert collector's own routing call: counted once, by the forward
                return
            x = args[0] if args else next(iter(kwargs.values()))
            accs.setdefault(key, HessianAccumulator(cols, dtype=hdt)).add(valid.rows(x.detach(), key))
        return hook

    hooks = [mod.register_forward_pre_hook(make_hook(name, mod.in_features), with_kwargs=True)
             for name, (mod, _) in targets.items()]
    if router_bits < 16:
        hooks.append(router.register_forward_pre_hook(make_hook(run.names[router], router.weight.shape[1]),
                                                      with_kwargs=True))
    collector = None
    if moe is not None:
        collector = ExpertCollector(moe, hdt, valid)
        hooks.append(moe.block.register_forward_pre_hook(collector, with_kwargs=True))
    try:
        collect_layer(step, valid)  # original weights: collect over the real tokens
    finally:
        for h in hooks:
            h.remove()

    for name, (mod, bits) in targets.items():
        run.linear(name, mod, bits, _inverse(accs.get(name), run.cfg))
    if router_bits < 16:
        res = quantize_weight(router.weight.data, router_bits, run.cfg, group_size=run.plan.group_size,
                              inv=_inverse(accs.get(run.names[router]), run.cfg))
        with torch.no_grad():
            router.weight.copy_(PackedTensor.from_result(res).dequantize(router.weight.dtype))
        run.report.routers[run.names[router]] = router_bits
    if moe is not None:
        run.report.layers.append(_quantize_experts(run.model, moe, run.plan, run.cfg, collector, run.dtype,
                                                   run.names))


def _inverse(acc: HessianAccumulator | None, cfg: QuantizeConfig) -> torch.Tensor | None:
    """GPTQ's inverse-Hessian factor of a collected Hessian (None when no token reached the weight: RTN)."""
    return prepare_inverse(acc.hessian(), damp=cfg.damp, act_order=cfg.act_order) if acc and acc.n else None


def _starved_phrase(min_tokens: int) -> str:
    """How the fallback's threshold reads: experts with no token fall back even with ``min_tokens`` 0."""
    return "no calibration token" if min_tokens <= 1 else f"fewer than {min_tokens} calibration tokens"


def _quantize_experts(model: nn.Module, moe: MoELayer, plan: BitPlan, cfg: QuantizeConfig,
                      col: ExpertCollector, dtype: torch.dtype, names: dict) -> LayerRecord:
    bits_list = plan.expert_bits(moe.index, moe.num_experts)
    st = moe.storage
    fused = isinstance(st, FusedExpertStorage)
    g = plan.group_size
    records: list[ExpertRecord] = []
    new_experts: list[nn.Module] = []
    bar = tqdm(range(moe.num_experts), desc=f"experts L{moe.index}", disable=not cfg.progress, leave=False)
    for e in bar:
        bits = bits_list[e]
        w = st.weights(e)
        n = col.tokens[e]
        if bits >= 16:
            records.append(ExpertRecord(bits=16, tokens=n, method="dense"))
            if fused:
                new_experts.append(DenseExpert(torch.cat([w.gate, w.up]), w.down, st.act_fn))
            continue
        starved = n < max(cfg.min_tokens, 1)
        res = quantize_expert(w, bits, cfg, group_size=g,
                              h_in=None if starved else col.h_in[e].hessian(),
                              h_down=None if starved else col.h_down[e].hessian())
        records.append(ExpertRecord(bits=bits, tokens=n, method="rtn" if starved else "gptq"))
        packed = {k: PackedTensor.from_result(r) for k, r in res.items()}
        mk = lambda p: QuantLinear(p, runtime=cfg.runtime, dtype=dtype)  # noqa: E731
        if fused:
            new_experts.append(QuantExpert(mk(packed["down"]), st.act_fn,
                                           gate_up=mk(concat_rows(packed["gate"], packed["up"]))))
        else:
            mod = st.module[e]
            for key, attr in zip(("gate", "up", "down"), st.names, strict=True):
                old = getattr(mod, attr)
                setattr(mod, attr, QuantLinear(packed[key], old.bias, runtime=cfg.runtime, dtype=dtype))
    if fused:
        _set_module(model, _experts_module_name(model, moe), QuantExperts(new_experts, st.act_fn))
    return LayerRecord(index=moe.index, path=moe.path, experts=records)
