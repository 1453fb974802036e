"""OTP: online top-any pruning (MC#; METHOD.md section 7 is our specification, the paper text is not public).

Per MoE layer a small mask predictor looks at the router input ``x`` and the router's top-k weights and gives, for
each of the token's top-k candidates ranked by weight, a keep logit; the strongest expert is always kept. At
inference the mask is hard (keep where ``logit + offset > 0``), so a token runs between 1 and k experts.

Training, layer by layer on cached calibration inputs with the model (quantized or not) frozen
(:func:`train_otp`):

- every selected expert's output ``y_r`` (rank r = 0..k-1 by weight) is computed once per calibration token;
- relaxed masks are sampled with the binary concrete (Gumbel-Softmax) distribution,
  ``m_r = sigmoid((l_r + g1 - g2) / tau)`` with ``g1, g2 ~ Gumbel(0, 1)``, ``m_0 = 1``; ``tau`` is annealed
  geometrically from ``tau_start`` to ``tau_end``; optionally straight-through hard masks in the last part;
- the block output with the mask is ``sum_r w'_r m_r y_r`` where ``w'`` is what the router would apply to the
  smaller selection (renormalised over kept experts for renormalising routers, unchanged otherwise);
- loss = distillation ``||out(all top-k) - out(mask)||^2 / E||out(all top-k)||^2`` (routed part; shared experts
  cancel) ``+ lambda * mean(m_{r>0})``; with a requested ``prune_rate`` (fraction of top-k pairs removed) the
  penalty is instead ``rho * (mean(m_{r>0}) - keep_target)^2`` toward that activation ratio, and after training a
  per-layer ``offset`` is set so that the hard masks remove exactly that fraction on the calibration tokens.

Example::

    iface = ExpertInterface(model, adapter)       # adapter = model_adapters.get_adapter(model)
    predictors, report = train_otp(model, batches, OTPConfig(prune_rate=0.2), iface=iface)
    with iface, OTPRule(iface, predictors):
        model(**inputs)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from mcmoe_vl.moe.interface import ExpertInterface
from mcmoe_vl.moe.layer import MoELayer
from mcmoe_vl.moe.layerwise import iterate_layers
from mcmoe_vl.moe.routing import Routing, RoutingDecision

from .method import PruningMethod
from .odp import RoutingRule, check_interface_of, decision_from_keep, select_layers

log = logging.getLogger(__name__)


class OTPConfig(BaseModel):
    """How the OTP mask predictors are built and trained.

    ``width``: hidden width of the predictor MLP (0: a linear map). ``prune_rate``: requested fraction of top-k
    (token, expert) pairs removed, reached through the penalty weight ``rho`` (None: a fixed ``lam`` penalty on
    the mean relaxed mask instead). ``steps`` of Adam at
    ``lr`` on minibatches of ``batch_tokens`` tokens; at most ``max_tokens`` calibration tokens per layer.
    ``straight_through_from``: fraction of training after which hard masks are used forward (None: never).
    ``calibrate_offset``: with a ``prune_rate``, shift each layer's logits so the hard masks hit it exactly.
    ``init_at_target``: with a ``prune_rate``, start training from the ratio rule at that rate (else from keeping
    every pair).

    Example: ``OTPConfig(prune_rate=0.2, steps=300, layers=[1, 2])``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal[PruningMethod.OTP] = PruningMethod.OTP  # the tag of a pruning config (suite recipes: "otp")
    width: int = Field(32, ge=0)
    prune_rate: float | None = Field(None, ge=0.0, lt=1.0)
    lam: float = Field(0.05, ge=0.0)
    rho: float = Field(10.0, gt=0.0)
    steps: int = Field(300, ge=1)
    lr: float = Field(5e-3, gt=0.0)
    batch_tokens: int = Field(512, ge=1)
    max_tokens: int = Field(8192, ge=1)
    tau_start: float = Field(1.0, gt=0.0)
    tau_end: float = Field(0.1, gt=0.0)
    straight_through_from: float | None = Field(0.8, ge=0.0, le=1.0)
    calibrate_offset: bool = True
    init_at_target: bool = True
    init_logit: float = 3.0
    seed: int = 0
    layers: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> OTPConfig:
        if self.tau_end > self.tau_start:
            raise ValueError(f"tau must anneal downwards: tau_start={self.tau_start} < tau_end={self.tau_end}")
        return self


class MaskPredictor(nn.Module):
    """Keep logits for a token's top-k experts, ranked by routing weight (rank 0, the top-1, is always kept).

    ``logit_r = mlp([x / rms(x), log(w_1 / w_0), ..., log(w_{k-1} / w_0)])_r + c_r * log(w_r / w_0) + offset``
    for ranks r = 1..k-1. The MLP's last layer starts at zero and ``c_r`` at 1, so an untrained predictor is the
    ratio rule (keep iff ``log(w_r / w_0) > -bias``): training starts from ODP's rule and learns corrections.
    """

    def __init__(self, hidden_size: int, top_k: int, width: int = 32, init_logit: float = 3.0) -> None:
        super().__init__()
        if top_k < 2:
            raise ValueError("OTP needs top-k >= 2")
        self.hidden_size, self.top_k, self.width = hidden_size, top_k, width
        d_in = hidden_size + top_k - 1
        if width > 0:
            self.net = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, top_k - 1))
        else:
            self.net = nn.Sequential(nn.Linear(d_in, top_k - 1))
        with torch.no_grad():
            last = self.net[-1]
            last.weight.zero_()
            last.bias.fill_(init_logit)  # with c = 1: keep pairs whose ratio is above exp(-init_logit)
        self.ratio_coef = nn.Parameter(torch.ones(top_k - 1))
        self.register_buffer("offset", torch.zeros(()))

    @staticmethod
    def rank(topk_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ordered by decreasing weight (T, k) and the weights in that order (float32)."""
        w = topk_weight.float()
        order = torch.argsort(w, dim=-1, descending=True, stable=True)  # (T, k)
        return order, w.gather(1, order)

    def ranked_logits(self, x: torch.Tensor, w_sorted: torch.Tensor) -> torch.Tensor:
        """(T, k-1) logits of ranks 1..k-1 (without the offset). ``x`` (T, H), ``w_sorted`` (T, k) descending."""
        x = x.float()
        xn = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)  # (T, H)
        log_ratio = (w_sorted[:, 1:] / w_sorted[:, :1].clamp_min(1e-20)).clamp_min(1e-9).log()  # (T, k-1)
        feats = torch.cat([xn, log_ratio], dim=-1)  # (T, H + k - 1)
        return self.net(feats) + self.ratio_coef * log_ratio

    def forward(self, x: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """(T, k) logits in the router's slot order; the top-1 slot gets +inf."""
        order, w_sorted = self.rank(topk_weight)
        ranked = self.ranked_logits(x, w_sorted) + self.offset  # (T, k-1)
        top = torch.full_like(ranked[:, :1], float("inf"))
        logits = torch.empty_like(order, dtype=ranked.dtype)
        logits.scatter_(1, order, torch.cat([top, ranked], dim=1))
        return logits

    def keep(self, x: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """(T, k) bool hard mask: keep where the logit is positive; the top-1 always."""
        return self.forward(x, topk_weight) > 0


# -- training data of one layer --------------------------------------------------------------------------------------
class LayerData:
    """Frozen calibration data of one MoE layer, ranks ordered by decreasing routing weight."""

    def __init__(self, x: torch.Tensor, w_sorted: torch.Tensor, y: torch.Tensor, renormalise: bool) -> None:
        self.x = x  # (N, H) router inputs
        self.w = w_sorted  # (N, k) applied weights by rank
        self.y = y  # (N, k, H) each ranked expert's output (unweighted)
        self.renormalise = renormalise
        self.teacher = (self.w[..., None] * self.y).sum(dim=1)  # (N, H) all top-k
        self.energy = float(self.teacher.pow(2).sum(dim=-1).mean().clamp_min(1e-20))

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    def student(self, idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Block output (routed part) for tokens ``idx`` with masks ``m`` (n, k), rank 0 = 1."""
        w = self.w[idx]  # (n, k)
        wm = w * m
        if self.renormalise:  # the router's weights for the smaller selection
            wm = wm * (w.sum(dim=-1, keepdim=True) / wm.sum(dim=-1, keepdim=True).clamp_min(1e-20))
        return (wm[..., None] * self.y[idx]).sum(dim=1)

    def distill(self, idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Relative distillation loss on tokens ``idx``."""
        d = self.student(idx, m) - self.teacher[idx]
        return d.pow(2).sum(dim=-1).mean() / self.energy


def layer_data(layer: MoELayer, x: torch.Tensor, routing_idx: torch.Tensor, routing_weight: torch.Tensor, *,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerData:
    """Compute every selected expert's output once (no grad) with the layer's current expert implementations.

    ``device`` / ``dtype``: where and in which precision the experts run (default: those of ``x``); the data is
    kept in float32 on the CPU.
    """
    device = x.device if device is None else device
    dtype = x.dtype if dtype is None else dtype
    order, w_sorted = MaskPredictor.rank(routing_weight)
    idx_sorted = routing_idx.gather(1, order)  # (N, k)
    N, k = idx_sorted.shape
    y = torch.zeros(N, k, x.shape[1], dtype=torch.float32)
    with torch.no_grad():
        for e in idx_sorted.unique().tolist():
            tok, rank = (idx_sorted == e).nonzero(as_tuple=True)
            y[tok, rank] = layer.expert(e)(x[tok].to(device=device, dtype=dtype)).float().cpu()
    return LayerData(x.float().cpu(), w_sorted.cpu(), y, layer.spec.norm_topk_prob)


def _logistic_noise(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=g).clamp(1e-6, 1 - 1e-6)
    return u.log() - (-u).log1p()  # g1 - g2 of two Gumbel(0, 1) draws is Logistic(0, 1)


def _drop_threshold(logits: torch.Tensor, drop: float) -> float:
    """The value ``t`` such that ``logit > t`` keeps all but the ``ceil(drop * n)`` smallest logits."""
    flat = logits.reshape(-1).sort().values
    n_drop = min(flat.numel(), int(math.ceil(drop * flat.numel() - 1e-9)))
    return float(flat[n_drop - 1]) if n_drop > 0 else float(flat[0]) - 1.0


def fit_mask_predictor(data: LayerData, top_k: int, config: OTPConfig) -> tuple[MaskPredictor, dict[str, float]]:
    """Train one layer's predictor on its frozen data (see the module docstring). Returns it and a summary."""
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    pred = MaskPredictor(data.x.shape[1], top_k, config.width, config.init_logit)
    opt = torch.optim.Adam(pred.parameters(), lr=config.lr)
    N = data.num_tokens
    target_keep = None if config.prune_rate is None else 1.0 - config.prune_rate * top_k / (top_k - 1)
    if target_keep is not None and target_keep < -1e-9:
        raise ValueError(f"prune_rate {config.prune_rate} impossible for top-{top_k}: at most {(top_k - 1) / top_k:.3f}")
    if target_keep is not None and config.init_at_target:
        # Start as the ratio rule at the requested rate: shift the bias to the matching quantile.
        with torch.no_grad():
            l0 = torch.cat([pred.ranked_logits(data.x[s:s + 4096], data.w[s:s + 4096]) for s in range(0, N, 4096)])
            pred.net[-1].bias.sub_(_drop_threshold(l0, 1.0 - target_keep))
    lam = config.lam
    n_batch = min(config.batch_tokens, N)
    st_from = None if config.straight_through_from is None else int(config.straight_through_from * config.steps)
    ones = torch.ones(n_batch, 1)
    for step in range(config.steps):
        frac = step / max(1, config.steps - 1)
        tau = config.tau_start * (config.tau_end / config.tau_start) ** frac
        idx = torch.randperm(N, generator=g)[:n_batch]
        logits = pred.ranked_logits(data.x[idx], data.w[idx])  # (n, k-1)
        m = torch.sigmoid((logits + _logistic_noise(tuple(logits.shape), g)) / tau)
        if st_from is not None and step >= st_from:
            m = (m > 0.5).float() + m - m.detach()
        distill = data.distill(idx, torch.cat([ones, m], dim=1))
        mean_m = m.mean()
        if target_keep is None:
            loss = distill + lam * mean_m
        else:  # quadratic penalty toward the requested fraction of kept non-top-1 pairs
            loss = distill + config.rho * (mean_m - target_keep) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = torch.cat([pred.ranked_logits(data.x[s:s + 4096], data.w[s:s + 4096]) for s in range(0, N, 4096)])
        if target_keep is not None and config.calibrate_offset:
            pred.offset.fill_(-_drop_threshold(logits, 1.0 - target_keep))
        hard = (logits + pred.offset > 0).float()  # (N, k-1)
        all_idx = torch.arange(N)
        hard_loss = float(data.distill(all_idx, torch.cat([torch.ones(N, 1), hard], dim=1)))
    kept = 1.0 + float(hard.sum(dim=1).mean())
    summary = {"tokens": float(N), "distill_hard": hard_loss, "active_experts": kept,
               "pruned_fraction": 1.0 - kept / top_k, "offset": float(pred.offset)}
    return pred.eval().requires_grad_(False), summary


# -- the whole model, layer by layer ---------------------------------------------------------------------------------
def train_otp(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    config: OTPConfig | None = None,
    *,
    iface: ExpertInterface,
    progress: bool = True,
) -> tuple[dict[int, MaskPredictor], dict[int, dict[str, float]]]:
    """Train a mask predictor for every selected MoE layer on calibration ``batches`` (model frozen).

    Layers run one at a time over cached inputs (:mod:`mcmoe_vl.moe.layerwise`); each layer's inputs come from
    the unpruned layers before it. Returns the predictors by decoder layer index and a per-layer summary.
    """
    config = config or OTPConfig()
    check_interface_of(iface, model)
    layers = {la.index: la for la in select_layers(iface, config.layers)}
    for la in layers.values():
        if la.top_k < 2:
            raise ValueError(f"{la.path}: top-{la.top_k} routing has nothing for OTP to prune")
        if config.prune_rate is not None and config.prune_rate > (la.top_k - 1) / la.top_k:
            raise ValueError(f"prune_rate {config.prune_rate} impossible for top-{la.top_k} ({la.path})")
    was_installed = iface.installed
    iface.install()
    predictors: dict[int, MaskPredictor] = {}
    summaries: dict[int, dict[str, float]] = {}
    last = max(layers)
    try:
        steps = iterate_layers(model, batches, adapter=iface.adapter, progress="OTP" if progress else False,
                               stop=last + 1)
        for step in steps:
            la = layers.get(step.index)
            if la is None:
                continue
            cap = step.capture(iface)  # the block's real tokens and the model's own routing of them
            device, dtype = cap.tokens[-1].device, cap.tokens[-1].dtype  # where the experts run
            x = torch.cat([t.float().cpu() for t in cap.tokens])
            idx = torch.cat([r.topk_idx.cpu() for r in cap.routing])
            w = torch.cat([r.topk_weight.float().cpu() for r in cap.routing])
            if x.shape[0] > config.max_tokens:
                sel = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))[: config.max_tokens]
                x, idx, w = x[sel], idx[sel], w[sel]
            data = layer_data(la, x, idx, w, device=device, dtype=dtype)
            with torch.enable_grad():
                pred, summary = fit_mask_predictor(data, la.top_k, config)
            predictors[la.index], summaries[la.index] = pred, summary
            log.info("OTP layer %d: %.2f of %d experts active (%.1f%% pruned), hard-mask distillation %.4f",
                     la.index, summary["active_experts"], la.top_k, 100 * summary["pruned_fraction"],
                     summary["distill_hard"])
    finally:
        if not was_installed:
            iface.uninstall()
    return predictors, summaries


# -- the routing override --------------------------------------------------------------------------------------------
class OTPRule(RoutingRule):
    """The OTP routing override: hard masks from the predictors on the layers that have one."""

    def __init__(self, iface: ExpertInterface, predictors: Mapping[int, MaskPredictor]) -> None:
        self.iface = iface
        self.predictors = dict(predictors)
        self.layers = select_layers(iface, sorted(self.predictors))
        for la in self.layers:
            p = self.predictors[la.index]
            if p.top_k != la.top_k:
                raise ValueError(f"{la.path}: predictor for top-{p.top_k}, layer routes top-{la.top_k}")
        self._installed = False

    def __call__(self, layer: MoELayer, hidden: torch.Tensor, batch_shape: tuple[int, ...], routing: Routing
                 ) -> RoutingDecision | None:
        pred = self.predictors.get(layer.index)
        if pred is None:
            return None
        with torch.no_grad():
            if next(pred.parameters()).device != hidden.device:
                pred.to(hidden.device)  # once: the predictor runs where the layer runs
            keep = pred.keep(hidden, routing.topk_weight)
        return decision_from_keep(routing, keep, layer)
