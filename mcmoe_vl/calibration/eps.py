"""The quantization-error table eps (MC-MoE paper Eq. 3) and the HAWQ-v2 sensitivities, from cached block inputs.

    eps_{i,j} = sum over batches b of || F(x_b; theta) - F(x_b; theta[e_i -> Q(e_i, j)]) ||_F

F is the MoE block output (routed + shared experts, same router). Quantizing only expert i changes F only on the
tokens routed to i (the router, the shared experts and every other expert are untouched, and a token selects an
expert at most once), and there by ``g_t * (E_i(x_t) - E_i^Q(x_t))`` with ``g_t`` the weight the model applies.
So the difference is computed from expert i's own tokens -- exact, and ``n`` times cheaper than re-running the
block per expert. ``tests/test_calibration_eps.py`` checks it against the full-block difference.

``Q`` is the quantizer the model will really be quantized with: round-to-nearest (:func:`rtn_quantizer`, the
paper's choice) or GPTQ on the expert's own Hessians (:func:`gptq_quantizer`: ``H = 2 X^T X / n`` of the expert's
tokens for gate / up, of ``act(gate x) * up x`` for down, through the quantization engine's own
``mcmoe_vl.quant.model.quantize_expert``; experts with fewer than ``min_tokens`` tokens take the engine's
round-to-nearest fallback, as they will in the checkpoint).

HAWQ-v2 (Dong et al. 2020), per expert and width: ``sum_m Tr(H_m) / d_m * ||W_m - Q_j(W_m)||_F^2`` over the
expert's matrices m, where ``H = 2 X X^T`` is the Hessian of the layer-wise reconstruction loss for the inputs X
the matrix sees (gate and up: the expert's tokens; down: ``act(gate x) * up x``), so ``Tr(H) = 2 sum ||x||^2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mcmoe_vl.moe.storage import ExpertWeights


Quantizer = Callable[[torch.Tensor, int], torch.Tensor]  # (W, bits) -> dequantized W


class ExpertQuantizer:
    """Quantizes a whole expert at a width; ``needs_hessians``: it wants the expert's input Hessians."""

    needs_hessians = False

    def __call__(self, w: ExpertWeights, bits: int, *, h_in: torch.Tensor | None = None,
                 h_down: torch.Tensor | None = None, tokens: int = 0) -> ExpertWeights:
        raise NotImplementedError


class _PerMatrix(ExpertQuantizer):
    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer

    def __call__(self, w: ExpertWeights, bits: int, **_: object) -> ExpertWeights:
        return quantize_expert(w, bits, self.quantizer)


class _GPTQ(ExpertQuantizer):
    needs_hessians = True

    def __init__(self, group_size: int, min_tokens: int, refit_1bit: bool, damp: float) -> None:
        from mcmoe_vl.quant.model import QuantizeConfig

        self.group_size, self.min_tokens = group_size, min_tokens
        self.config = QuantizeConfig(damp=damp, refit_1bit=refit_1bit, min_tokens=min_tokens, progress=False)

    def __call__(self, w: ExpertWeights, bits: int, *, h_in: torch.Tensor | None = None,
                 h_down: torch.Tensor | None = None, tokens: int = 0) -> ExpertWeights:
        from mcmoe_vl.quant.model import quantize_expert as engine_quantize_expert

        starved = tokens < max(self.min_tokens, 1)  # the engine's rule: round-to-nearest fallback
        res = engine_quantize_expert(w, bits, self.config, group_size=self.group_size,
                                     h_in=None if starved else h_in, h_down=None if starved else h_down)
        return ExpertWeights(gate=res["gate"].weight, up=res["up"].weight, down=res["down"].weight)


def gptq_quantizer(group_size: int = 128, *, min_tokens: int = 16, refit_1bit: bool = False,
                   damp: float = 0.01) -> ExpertQuantizer:
    """GPTQ of the quantization engine on the expert's own Hessians (RTN for starved experts)."""
    return _GPTQ(group_size, min_tokens, refit_1bit, damp)


@dataclass
class CapturedBatch:
    """One calibration batch as seen by a MoE block (padding removed)."""

    hidden: torch.Tensor  # (T, H) block input
    topk_idx: torch.Tensor  # (T, k)
    topk_weight: torch.Tensor  # (T, k) weights as applied


@dataclass
class ExpertErrors:
    """Per-expert results for one layer; tables are (n,) per width."""

    eps: dict[int, list[float]] = field(default_factory=dict)
    weight_error: dict[int, list[float]] = field(default_factory=dict)
    hawq: dict[int, list[float]] = field(default_factory=dict)
    hessian_trace_in: list[float] = field(default_factory=list)
    hessian_trace_mid: list[float] = field(default_factory=list)


def expert_forward(w: ExpertWeights, act_fn: Callable[[torch.Tensor], torch.Tensor],
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = down(act(gate x) * up x)`` for x (t, H); returns (y (t, H), the down input h (t, I))."""
    h = act_fn(F.linear(x, w.gate)) * F.linear(x, w.up)
    return F.linear(h, w.down), h


class WeightsExpert(nn.Module):
    """An expert module computing with given 2-D weights (for replacing an expert in a block)."""

    def __init__(self, w: ExpertWeights, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.w, self.act_fn = w, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expert_forward(self.w, self.act_fn, x)[0]


def quantize_expert(w: ExpertWeights, bits: int, quantizer: Quantizer) -> ExpertWeights:
    return ExpertWeights(gate=quantizer(w.gate, bits), up=quantizer(w.up, bits), down=quantizer(w.down, bits))


def rtn_quantizer(group_size: int = 128) -> Quantizer:
    """Round-to-nearest Q(W, j) of the quantization engine (METHOD.md section 2): per (row, group) asymmetric
    min-max (range containing 0) for j >= 2, ``s * sign(W)`` with ``s = mean |W|`` for j = 1, scales and zeros
    rounded to their 16-bit storage type -- the same values a round-to-nearest checkpoint stores."""
    from mcmoe_vl.quant.gptq import rtn_quantize
    from mcmoe_vl.quant.quantizer import get_quantizer

    def q(w: torch.Tensor, bits: int) -> torch.Tensor:
        return rtn_quantize(w, get_quantizer(bits), group_size=group_size).weight.to(w.dtype)

    return q


def expert_errors(
    batches: list[CapturedBatch],
    weights: Callable[[int], ExpertWeights],
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    num_experts: int,
    bits: tuple[int, ...],
    quantizer: Quantizer | ExpertQuantizer,
    *,
    progress: bool = False,
    desc: str = "experts",
) -> ExpertErrors:
    """eps, ||W - Q(W)||^2, HAWQ sensitivities and Hessian traces for every expert of one layer (float32).

    ``quantizer``: a per-matrix ``(W, bits) -> W_hat`` (round-to-nearest) or an :class:`ExpertQuantizer`."""
    if not isinstance(quantizer, ExpertQuantizer):
        quantizer = _PerMatrix(quantizer)
    out = ExpertErrors(
        eps={b: [] for b in bits}, weight_error={b: [] for b in bits}, hawq={b: [] for b in bits}
    )
    for i in tqdm(range(num_experts), desc=desc, disable=not progress, leave=False):
        w = weights(i)
        w32 = ExpertWeights(gate=w.gate.detach().float(), up=w.up.detach().float(), down=w.down.detach().float())
        # The expert's tokens and applied weights, per batch.
        sel: list[tuple[torch.Tensor, torch.Tensor]] = []
        tr_in = tr_mid = 0.0
        ys: list[torch.Tensor] = []
        hess = _ExpertHessians(w32) if quantizer.needs_hessians else None
        for cb in batches:
            tok, slot = (cb.topk_idx == i).nonzero(as_tuple=True)
            x = cb.hidden[tok].float()  # (t, H)
            g = cb.topk_weight[tok, slot].float()[:, None]  # (t, 1)
            sel.append((x, g))
            y, h = expert_forward(w32, act_fn, x)
            ys.append(y)
            if hess is not None:
                hess.add(x, h)
            tr_in += 2.0 * float(x.double().pow(2).sum())
            tr_mid += 2.0 * float(h.double().pow(2).sum())
        out.hessian_trace_in.append(tr_in)
        out.hessian_trace_mid.append(tr_mid)
        d_in, d_mid = w32.gate.shape[1], w32.down.shape[1]
        kw = {} if hess is None else {"h_in": hess.h_in.hessian(), "h_down": hess.h_down.hessian(),
                                      "tokens": hess.h_in.n}
        for b in bits:
            q = quantizer(w32, b, **kw)
            e = 0.0
            for (x, g), y in zip(sel, ys):
                if x.shape[0]:
                    e += float(torch.linalg.vector_norm((g * (y - expert_forward(q, act_fn, x)[0])).double()))
            dg, du, dd = ((a - c).double().pow(2).sum().item() for a, c in
                          ((w32.gate, q.gate), (w32.up, q.up), (w32.down, q.down)))
            out.eps[b].append(e)
            out.weight_error[b].append(dg + du + dd)
            out.hawq[b].append(tr_in / d_in * (dg + du) + tr_mid / d_mid * dd)
    return out


class _ExpertHessians:
    """``H = 2 X^T X / n`` of one expert's gate/up input and down input, as the quantization engine collects them."""

    def __init__(self, w: ExpertWeights) -> None:
        from mcmoe_vl.quant.gptq import HessianAccumulator

        self.h_in = HessianAccumulator(w.gate.shape[1])
        self.h_down = HessianAccumulator(w.down.shape[1])

    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        self.h_in.add(x)
        self.h_down.add(h)
