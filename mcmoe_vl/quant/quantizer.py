"""Per-(row, group) weight quantizers: asymmetric min-max at 2-4 bits, binarisation at 1 bit.

A quantizer maps a slice of columns ``w`` (R, c) to integer codes with parameters per row, and back:

- :class:`MinMaxQuantizer` (``bits`` in 2..4), asymmetric min-max with the range always containing zero::

      xmin = min(min w, 0), xmax = max(max w, 0)       (both 0 -> -1, +1)
      scale = (xmax - xmin) / (2^bits - 1),  zero = round(-xmin / scale)
      q = clamp(round(w / scale) + zero, 0, 2^bits - 1),   w_hat = scale * (q - zero)

  ``round`` is round-half-to-even (``torch.round``). With ``range_search`` the range ``[f xmin, f xmax]`` is tried
  for 101 factors ``f`` in [0.9, 1.1] and, per row, the one minimising ``sum |w_hat - w|^2.4`` is kept.
- :class:`BinaryQuantizer` (1 bit, MC-MoE Appendix A.2): ``B = sign(W)`` (0 counts as +1), stored as
  ``q = (B + 1) / 2``, dequantised ``w_hat = s * B = s * (2q - 1)`` with ``s = mean |w|`` per (row, group).
  With ``refit`` (beyond the paper), once GPTQ has fixed the signs the scales of each row are re-solved to
  minimise the Hessian-weighted output error (:func:`refit_binary_scales`); storage and dequantisation unchanged.

Scales and zeros are rounded to their storage dtype (16-bit, ``param_dtype``) when they are computed, so the
values GPTQ feeds back are exactly the ones a checkpoint stores and the runtimes dequantise.

Quantizers are pluggable: :func:`get_quantizer` looks the width up in :data:`QUANTIZERS` (register new kinds
with :func:`register_quantizer`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch


class QuantKind(str, enum.Enum):
    MINMAX = "minmax"  # asymmetric min-max, 2-4 bits
    BINARY = "binary"  # sign binarisation, 1 bit


@dataclass
class QParams:
    """Per-row parameters of one group: ``scale`` (R,) and ``zero`` (R,) (``zero`` is None for 1 bit)."""

    scale: torch.Tensor
    zero: torch.Tensor | None


class Quantizer:
    """Interface: ``params`` for a group of columns, ``quantize`` to codes, ``dequantize`` back (float32)."""

    bits: int
    kind: QuantKind
    param_dtype: torch.dtype

    def params(self, w: torch.Tensor) -> QParams:  # w (R, c)
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, p: QParams) -> torch.Tensor:  # (R, ...) -> uint8 codes
        raise NotImplementedError

    def dequantize(self, q: torch.Tensor, p: QParams) -> torch.Tensor:  # codes -> float32
        raise NotImplementedError

    def fake(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        return self.dequantize(self.quantize(w, p), p)


def dequantize_minmax(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)`` in float32 (the single dequantisation formula, shared by every runtime)."""
    return scale.float() * (q.float() - zero.float())


def dequantize_binary(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``s * (2q - 1)`` in float32."""
    return scale.float() * (q.float() * 2.0 - 1.0)


class MinMaxQuantizer(Quantizer):
    kind = QuantKind.MINMAX

    def __init__(self, bits: int, *, range_search: bool = False, param_dtype: torch.dtype = torch.float16,
                 grid: int = 101, search_lo: float = 0.9, search_hi: float = 1.1, norm: float = 2.4) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"min-max quantization needs 2..8 bits, got {bits}")
        self.bits = bits
        self.maxq = (1 << bits) - 1
        self.range_search = range_search
        self.param_dtype = param_dtype
        self.factors = torch.linspace(search_lo, search_hi, grid).tolist()
        self.norm = norm

    def _from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> QParams:
        scale = ((xmax - xmin) / self.maxq).to(self.param_dtype)
        tiny = torch.finfo(self.param_dtype).tiny
        scale = torch.where(scale.float() > 0, scale, torch.full_like(scale, tiny)).float()
        zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return QParams(scale=scale, zero=zero.to(self.param_dtype).float())

    def params(self, w: torch.Tensor) -> QParams:
        w = w.float()
        xmin = torch.clamp(w.min(dim=1).values, max=0)  # (R,)
        xmax = torch.clamp(w.max(dim=1).values, min=0)
        both = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both, -1.0, xmin)
        xmax = torch.where(both, 1.0, xmax)
        if not self.range_search:
            return self._from_range(xmin, xmax)
        best = None
        best_err = torch.full_like(xmin, float("inf"))
        for f in self.factors:
            p = self._from_range(xmin * f, xmax * f)
            err = (self.fake(w, p) - w).abs_().pow_(self.norm).sum(dim=1)  # (R,)
            if best is None:
                best, best_err = p, err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = QParams(torch.where(better, p.scale, best.scale), torch.where(better, p.zero, best.zero))
        return best

    def quantize(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        s, z = _bcast(p.scale, w), _bcast(p.zero, w)
        return torch.clamp(torch.round(w.float() / s) + z, 0, self.maxq).to(torch.uint8)

    def dequantize(self, q: torch.Tensor, p: QParams) -> torch.Tensor:
        return dequantize_minmax(q, _bcast(p.scale, q), _bcast(p.zero, q))


class BinaryQuantizer(Quantizer):
    kind = QuantKind.BINARY
    bits = 1

    def __init__(self, *, param_dtype: torch.dtype = torch.float16, refit: bool = False) -> None:
        self.param_dtype = param_dtype
        self.refit = refit  # GPTQ re-solves the scales for its final signs (refit_binary_scales)

    def params(self, w: torch.Tensor) -> QParams:
        s = w.float().abs().mean(dim=1).to(self.param_dtype).float()  # (R,)
        return QParams(scale=s, zero=None)

    def quantize(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        return (w >= 0).to(torch.uint8)

    def dequantize(self, q: torch.Tensor, p: QParams) -> torch.Tensor:
        return dequantize_binary(q, _bcast(p.scale, q))


def _group_sum(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R, C) -> (R, G): sums over consecutive groups of ``group_size`` columns (the last may be short)."""
    r, c = t.shape
    idx = torch.arange(c, device=t.device) // group_size
    return torch.zeros(r, (c + group_size - 1) // group_size, dtype=t.dtype, device=t.device).index_add_(1, idx, t)


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row ``(w - w_hat)^T H (w - w_hat)`` (R,), in ``h``'s dtype: the layer-output error GPTQ minimises."""
    d = (w - w_hat).to(h.dtype)  # (R, C)
    return ((d @ h) * d).sum(dim=1)


@torch.no_grad()
def refit_binary_scales(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, h: torch.Tensor, *,
                        group_size: int, param_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Scales (R, G) minimising the Hessian-weighted error of ``w`` (R, C) for fixed 1-bit ``codes`` (R, C).

    With ``B = 2 codes - 1`` and ``M_r`` (C, G) the matrix whose column g is ``B_r`` on group g and 0 elsewhere, each
    row solves ``min_s (w_r - M_r s)^T H (w_r - M_r s)``, i.e. the G x G normal equations
    ``(M_r^T H M_r) s = M_r^T H w_r`` (closed form; one unknown per group). Entry (g, j) of ``M_r^T H M_r`` is
    ``B_rg^T H_gj B_rj``, built group by group with one (R, g) x (g, C) product each: R C^2 work in all, the
    cost of one GPTQ error evaluation. The solution is rounded to ``param_dtype`` as stored; a row keeps its
    previous ``scale`` unless the rounded refit lowers its weighted error, so the refit never increases it.
    Computed in ``h``'s dtype (pass a float64 Hessian for a float64 solve).
    """
    dt = h.dtype
    g = group_size
    r, c = w.shape
    b = codes.to(dt) * 2 - 1  # (R, C) signs
    wd = w.to(dt)
    n_groups = (c + g - 1) // g
    a = torch.empty(r, n_groups, n_groups, dtype=dt)  # (R, G, G) normal matrices
    for j in range(n_groups):
        cols = slice(j * g, min((j + 1) * g, c))
        a[:, :, j] = _group_sum((b[:, cols] @ h[cols, :]) * b, g)  # B_rg^T H_gj B_rj for every g
    rhs = _group_sum(b * (wd @ h), g)  # (R, G)
    diag = torch.diagonal(a, dim1=1, dim2=2)
    ridge = 1e-9 * diag.mean(dim=1).clamp_min(torch.finfo(dt).tiny)  # (R,) keeps dead groups solvable
    a = a + torch.diag_embed(ridge[:, None].expand(r, n_groups))
    new = torch.linalg.solve(a, rhs.unsqueeze(-1)).squeeze(-1)  # (R, G)
    new = new.to(param_dtype).to(torch.float32)
    new = torch.where(torch.isfinite(new), new, scale.float())

    def expand(s: torch.Tensor) -> torch.Tensor:  # (R, G) -> (R, C)
        return s.repeat_interleave(g, dim=1)[:, :c].to(dt)

    better = weighted_error(wd, expand(new) * b, h) < weighted_error(wd, expand(scale) * b, h)
    return torch.where(better[:, None], new, scale.float())


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1))) if like.dim() > 1 else v


QuantizerFactory = Callable[..., Quantizer]
QUANTIZERS: dict[int, QuantizerFactory] = {
    1: lambda **kw: BinaryQuantizer(param_dtype=kw.get("param_dtype", torch.float16), refit=kw.get("refit", False)),
    2: lambda **kw: MinMaxQuantizer(2, **kw),
    3: lambda **kw: MinMaxQuantizer(3, **kw),
    4: lambda **kw: MinMaxQuantizer(4, **kw),
}


def register_quantizer(bits: int, factory: QuantizerFactory, *, replace: bool = False) -> None:
    """Make ``get_quantizer(bits)`` build ``factory(**options)``."""
    if bits in QUANTIZERS and not replace:
        raise ValueError(f"a quantizer for {bits} bits is already registered (pass replace=True to swap it)")
    QUANTIZERS[bits] = factory


def get_quantizer(bits: int, *, range_search: bool = False, param_dtype: torch.dtype = torch.float16,
                  refit_1bit: bool = False) -> Quantizer:
    """The quantizer for ``bits`` (1 -> binarisation, with the Hessian-weighted scale refit if asked; 2-4 ->
    min-max)."""
    if bits not in QUANTIZERS:
        raise ValueError(f"no quantizer for {bits} bits; valid widths: {sorted(QUANTIZERS)}")
    if bits == 1:
        return QUANTIZERS[1](param_dtype=param_dtype, refit=refit_1bit)
    return QUANTIZERS[bits](range_search=range_search, param_dtype=param_dtype)
