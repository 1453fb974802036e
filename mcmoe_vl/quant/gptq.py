"""The GPTQ core (Frantar et al. 2022) as pure functions on tensors, and round-to-nearest.

Convention: for a linear layer ``y = x W^T`` with weight ``W`` (R, C) and calibration inputs ``X`` (n, C), the
Hessian of the layer-output error ``||W X^T - Wq X^T||^2`` is ``H = 2 X^T X / n`` (C, C). Only its direction
matters to GPTQ (the scale cancels), but the ``1/n`` normalisation makes Hessians of experts with different token
counts comparable. :class:`HessianAccumulator` sums ``X^T X`` batch by batch (float32 or float64) and divides at
the end, so incremental and one-shot accumulation agree.

GPTQ (:func:`gptq_quantize`), given ``Hinv_U = chol(H_damped^-1)^T`` (upper Cholesky factor of the inverse,
:func:`prepare_inverse`, damping ``0.01 * mean(diag H)``), quantizes the columns of ``W`` one at a time and
spreads each column's error over the columns not yet quantized::

    for each block of B = 128 columns [i1, i2):
        for column i in the block:
            if i starts a group: params = quantizer.params(W[:, i : i + g])   # current (updated) weights
            q_i = Q(W[:, i]);  e_i = (W[:, i] - q_i) / Hinv_U[i, i]
            W[:, i:i2] -= e_i Hinv_U[i, i:i2]                               # within-block feedback
        W[:, i2:] -= E_block Hinv_U[i1:i2, i2:]                              # lazy batch update

The within-block feedback runs at every width (the reference MC-MoE code skipped it below 4 bits). With
``act_order`` the columns are visited by decreasing ``diag H``; group parameters are then computed in that
permuted order as columns are reached (GPTQModel's default), and the result is stored permuted (``perm`` is
returned; column ``k`` of the stored codes is column ``perm[k]`` of ``W``). With ``static_groups`` the group
parameters are instead computed up front from the unquantized ``W`` in natural column order, and the codes are
returned in natural order (no permutation is needed at run time).

gate and up projections of an expert see the same input: compute one :class:`GPTQInverse` and pass it to both.

At 1 bit with a refitting quantizer (``BinaryQuantizer(refit=True)``), once every sign is fixed the scales are
re-solved by Hessian-weighted least squares (:func:`mcmoe_vl.quant.quantizer.refit_binary_scales`, on the
undamped ``H`` kept in the :class:`GPTQInverse`); codes and storage are unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .quantizer import QParams, Quantizer, refit_binary_scales

log = logging.getLogger(__name__)


# -- Hessians ---------------------------------------------------------------------------------------------------
class HessianAccumulator:
    """Running ``sum X^T X`` over batches of inputs; :meth:`hessian` returns ``2 X^T X / n``."""

    def __init__(self, columns: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian accumulators must be float32 or float64, got {dtype}")
        self.xtx = torch.zeros(columns, columns, dtype=dtype, device=device)  # (C, C)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` (..., C) (all leading dims are tokens)."""
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.dtype)  # (t, C)
        if x.shape[1] != self.xtx.shape[0]:
            raise ValueError(f"inputs have {x.shape[1]} features but the Hessian is for {self.xtx.shape[0]}")
        self.xtx.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` (C, C); zeros when no token was added."""
        return self.xtx * (2.0 / max(self.n, 1))


def hessian_from_inputs(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-shot ``H = 2 X^T X / n`` for inputs ``x`` (n, C)."""
    acc = HessianAccumulator(x.shape[-1], dtype=dtype)
    acc.add(x)
    return acc.hessian()


@dataclass
class GPTQInverse:
    """What GPTQ needs from a Hessian; compute once, reuse for every weight with the same input (gate and up)."""

    hinv_u: torch.Tensor  # (C, C) upper Cholesky factor of (H_damped)^-1, in the column order of `perm`
    perm: torch.Tensor | None  # (C,) visiting order (act-order), None = natural
    dead: torch.Tensor  # (C,) bool: input features that never fired (diag H == 0); their weights are zeroed
    damp: float  # the damping actually added to the diagonal
    h: torch.Tensor | None = None  # (C, C) the undamped Hessian, natural order (the 1-bit scale refit needs it)


@torch.no_grad()
def prepare_inverse(h: torch.Tensor, *, damp: float = 0.01, act_order: bool = False,
                    dtype: torch.dtype = torch.float32) -> GPTQInverse:
    """Damp ``H`` by ``damp * mean(diag H)``, optionally reorder it (act-order), and factor its inverse.

    If the Cholesky factorisation fails (a numerically indefinite Hessian) the damping is raised tenfold, up to
    three times, with a warning.
    """
    h_given = h
    h = h.to(dtype).clone()
    c = h.shape[0]
    if h.shape != (c, c):
        raise ValueError(f"the Hessian must be square, got {tuple(h.shape)}")
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        h = h[perm][:, perm]
    mean_diag = torch.mean(torch.diagonal(h)).item()
    d = damp
    for attempt in range(4):
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            hinv_u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("Hessian needed damping %.3g (asked %.3g) to be positive definite", d, damp)
                return GPTQInverse(hinv_u=hinv_u, perm=perm, dead=dead, damp=d, h=h_given)
        d *= 10
    raise ValueError(f"the Hessian is not positive definite even with damping {d / 10:.3g} x mean(diag)")


# -- GPTQ -------------------------------------------------------------------------------------------------------
@dataclass
class QuantResult:
    """Codes and parameters of one quantized weight (R, C).

    ``codes`` (R, C) uint8 in storage order (natural, or ``perm`` order); ``scale`` / ``zero`` (R, G) per group of
    ``group_size`` consecutive stored columns (``zero`` None for 1 bit); ``weight`` (R, C) float32 the dequantized
    weight in natural column order; ``loss`` the GPTQ objective sum ``e_i^2 / 2`` (0 for round-to-nearest).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    perm: torch.Tensor | None
    weight: torch.Tensor
    bits: int
    group_size: int
    loss: float = 0.0


def _n_groups(c: int, g: int) -> int:
    return math.ceil(c / g)


# One piece on purpose (83 lines): it follows the paper's Algorithm 1 step for step, so that it reads against it.
@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    inv: GPTQInverse,
    quantizer: Quantizer,
    *,
    group_size: int = 128,
    block_size: int = 128,
    static_groups: bool = False,
) -> QuantResult:
    """GPTQ-quantize ``w`` (R, C) with a prepared inverse Hessian (see the module docstring)."""
    r, c = w.shape
    if inv.hinv_u.shape != (c, c):
        raise ValueError(f"weight has {c} input columns but the inverse Hessian is {tuple(inv.hinv_u.shape)}")
    g = group_size if group_size > 0 else c
    dtype = inv.hinv_u.dtype
    W = w.detach().to(dtype).clone()  # (R, C)
    W[:, inv.dead] = 0
    perm = inv.perm
    static: list[QParams] | None = None
    if static_groups:
        static = [quantizer.params(W[:, j : j + g]) for j in range(0, c, g)]
    if perm is not None:
        W = W[:, perm]
    hinv = inv.hinv_u
    G = _n_groups(c, g)
    # Work on the transpose (C, R): a column of W is then a contiguous row, which is what the loop touches.
    Wt = W.t().contiguous()  # (C, R)
    codes_t = torch.zeros(c, r, dtype=torch.uint8)
    deq_t = torch.zeros(c, r, dtype=dtype)
    scales = torch.zeros(r, G, dtype=torch.float32)
    zeros = torch.zeros(r, G, dtype=torch.float32)
    col_group = None
    if static is not None and perm is not None:
        col_group = (perm // g).tolist()  # stored column k belongs to natural group perm[k] // g
    losses = torch.zeros(r, dtype=dtype)
    p: QParams | None = None
    for i1 in range(0, c, block_size):
        i2 = min(i1 + block_size, c)
        W1 = Wt[i1:i2].clone()  # (b, R)
        Err1 = torch.zeros_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                p = static[col_group[col] if col_group is not None else col // g]
            elif col % g == 0:
                # current weights of the group: the updated block part, then the rest (lazily updated) of W
                end = min(col + g, c)
                grp = W1[i : i + (end - col)] if end <= i2 else torch.cat([W1[i:], Wt[i2:end]], dim=0)
                p = quantizer.params(grp.t())
                scales[:, col // g] = p.scale
                if p.zero is not None:
                    zeros[:, col // g] = p.zero
            wcol = W1[i]  # (R,)
            q = quantizer.quantize(wcol, p)
            codes_t[col] = q
            dq = deq_t[col]
            dq.copy_(quantizer.dequantize(q, p))
            err = Err1[i]
            torch.div(wcol - dq, H1[i, i], out=err)
            W1[i + 1 :].addr_(H1[i, i + 1 :], err, alpha=-1)
        losses += (Err1**2).sum(dim=0) / 2
        Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    codes = codes_t.t().contiguous()
    deq = deq_t.t()
    weight = deq
    if perm is not None:
        weight = torch.empty_like(deq)
        weight[:, perm] = deq
    zero_out: torch.Tensor | None = zeros
    if quantizer.bits == 1:
        zero_out = None
    if static is not None:
        scales = torch.stack([s.scale for s in static], dim=1)
        zero_out = None if quantizer.bits == 1 else torch.stack([s.zero for s in static], dim=1)
        if perm is not None:  # codes back to natural order; groups are natural
            nat = torch.empty_like(codes)
            nat[:, perm] = codes
            codes, perm = nat, None
    if quantizer.bits == 1 and getattr(quantizer, "refit", False) and inv.h is not None:
        scales, weight = _refit(w, codes, scales, inv, perm, g, quantizer.param_dtype)
    return QuantResult(codes=codes, scale=scales, zero=zero_out, perm=perm, weight=weight.float(),
                       bits=quantizer.bits, group_size=g, loss=float(losses.sum()))


def _refit(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, inv: GPTQInverse, perm: torch.Tensor | None,
           g: int, param_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit scales re-solved for GPTQ's final signs; returns (scales (R, G), dequantized weight natural order).

    Groups are consecutive in storage order (``perm`` order, or natural), so the refit works in that order."""
    h = inv.h.to(inv.hinv_u.dtype)
    target = w.detach().to(h.dtype).clone()
    target[:, inv.dead] = 0  # what GPTQ quantized: dead input features are zeroed
    if perm is not None:
        target, h = target[:, perm], h[perm][:, perm]
    scales = refit_binary_scales(target, codes, scales, h, group_size=g, param_dtype=param_dtype)
    deq = scales.repeat_interleave(g, dim=1)[:, : codes.shape[1]] * (codes.float() * 2 - 1)
    if perm is None:
        return scales, deq
    weight = torch.empty_like(deq)
    weight[:, perm] = deq
    return scales, weight


@torch.no_grad()
def rtn_quantize(w: torch.Tensor, quantizer: Quantizer, *, group_size: int = 128) -> QuantResult:
    """Round-to-nearest per (row, group): the fallback for experts with too few calibration tokens."""
    r, c = w.shape
    g = group_size if group_size > 0 else c
    W = w.detach().float()
    codes = torch.empty(r, c, dtype=torch.uint8)
    deq = torch.empty(r, c, dtype=torch.float32)
    G = _n_groups(c, g)
    scales = torch.zeros(r, G, dtype=torch.float32)
    zeros = torch.zeros(r, G, dtype=torch.float32)
    for j in range(G):
        sl = slice(j * g, min((j + 1) * g, c))
        p = quantizer.params(W[:, sl])
        q = quantizer.quantize(W[:, sl], p)
        codes[:, sl] = q
        deq[:, sl] = quantizer.dequantize(q, p)
        scales[:, j] = p.scale
        if p.zero is not None:
            zeros[:, j] = p.zero
    return QuantResult(codes=codes, scale=scales, zero=None if quantizer.bits == 1 else zeros, perm=None,
                       weight=deq, bits=quantizer.bits, group_size=g)


def output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """Relative layer-output error ``||W X^T - Wq X^T||_F^2 / ||W X^T||_F^2`` in float64."""
    w64, x64 = w.double(), x.double()
    ref = x64 @ w64.t()
    return float(((x64 @ wq.double().t() - ref) ** 2).sum() / (ref**2).sum())
