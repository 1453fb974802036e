"""Round-to-nearest fake quantization Q(W, j) used by the eps table (METHOD.md section 2).

Per (row, group of ``group_size`` input columns):

- j >= 2: asymmetric min-max. The range includes 0 (as GPTQ's quantizer does), ``scale = (max - min) / (2^j - 1)``,
  ``zero = round(-min / scale)``, ``Q = scale * (clamp(round(W / scale) + zero, 0, 2^j - 1) - zero)``.
- j = 1: binarisation (MC-MoE Appendix A.2): ``Q = s * sign(W)`` with ``sign(0) = +1`` and ``s = mean |W|``.

Scales and zeros stay in float32 here (the stored 16-bit rounding changes eps by far less than one width step). A
last group narrower than ``group_size`` is quantized on its own.
"""

from __future__ import annotations

import torch


def fake_quantize_rtn(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Dequantized round-to-nearest copy of ``w`` (rows, cols), grouped along the columns; same dtype as ``w``."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rows, cols = w.shape
    x = w.float()
    out = torch.empty_like(x)
    for c0 in range(0, cols, group_size):
        g = x[:, c0 : c0 + group_size]  # (rows, g)
        out[:, c0 : c0 + group_size] = _binarise(g) if bits == 1 else _minmax(g, bits)
    return out.to(w.dtype)


def _binarise(g: torch.Tensor) -> torch.Tensor:
    s = g.abs().mean(dim=1, keepdim=True)  # (rows, 1)
    return torch.where(g >= 0, s, -s)


def _minmax(g: torch.Tensor, bits: int) -> torch.Tensor:
    maxq = 2**bits - 1
    lo = g.min(dim=1, keepdim=True).values.clamp(max=0)  # (rows, 1)
    hi = g.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
    return scale * (q - zero)
