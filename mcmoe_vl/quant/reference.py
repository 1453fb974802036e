"""A textbook GPTQ, for checking the blocked core and as the benchmark baseline.

No blocking, no lazy updates, no Cholesky trick: the explicit inverse Hessian is downdated after every column
(the Optimal Brain Surgeon update ``Hinv <- Hinv - Hinv[:, i] Hinv[i, :] / Hinv[i, i]`` on the remaining columns) and every remaining
column is updated at once. Mathematically the same algorithm as :func:`mcmoe_vl.quant.gptq.gptq_quantize`
(natural order, groups computed as columns are reached), computed independently, in float64 by default.
"""

from __future__ import annotations

import torch

from .quantizer import Quantizer


def reference_gptq(w: torch.Tensor, h: torch.Tensor, quantizer: Quantizer, *, group_size: int = 128,
                   damp: float = 0.01, act_order: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dequantized GPTQ weight (R, C) in natural column order."""
    W = w.to(dtype).clone()  # (R, C)
    H = h.to(dtype).clone()  # (C, C)
    c = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(c)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diagonal(H)) * torch.eye(c, dtype=dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    p = None
    for i in range(c):
        if i % group_size == 0:
            p = quantizer.params(W[:, i : i + group_size])
        q = quantizer.dequantize(quantizer.quantize(W[:, i], p), p).to(dtype)
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i + 1 :].addr_(err, Hinv[i, i + 1 :], alpha=-1)
        # OBS downdate of the inverse restricted to the columns not yet quantized
        Hinv[i + 1 :, i + 1 :].addr_(Hinv[i + 1 :, i], Hinv[i, i + 1 :], alpha=-1 / Hinv[i, i].item())
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out
