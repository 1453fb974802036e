"""Checks on a model's weights before long work: every weight finite, and a fingerprint of the weights in memory.

::

    check_finite_weights(model, iface.layers)   # NonFiniteWeightError naming the layer, expert and matrix
    weights_fingerprint(model)                  # sha256 over every parameter and buffer (names, shapes, bytes)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from .layer import MoELayer


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or infinity; the message names the tensor (and the expert)."""


def _bad_count(t: torch.Tensor) -> int:
    return 0 if not t.is_floating_point() else int((~torch.isfinite(t.detach())).sum())


def check_finite_weights(model: nn.Module, layers: Iterable[MoELayer] = ()) -> None:
    """Raise :class:`NonFiniteWeightError` on the first NaN or infinite weight.

    Routed experts are checked through the expert interface first, so that a fused 3-D tensor is named with its
    layer and expert; then every parameter of the model by name.
    """
    for layer in layers:
        for e in range(layer.num_experts):
            w = layer.storage.weights(e)
            for part in ("gate", "up", "down"):
                n = _bad_count(getattr(w, part))
                if n:
                    raise NonFiniteWeightError(
                        f"{layer.path}: expert {e} ({part} projection) has {n} NaN or infinite weights; the "
                        f"checkpoint is corrupted: restore it (valid: finite weights only)")
    for name, p in model.named_parameters():
        n = _bad_count(p)
        if n:
            raise NonFiniteWeightError(f"weight {name} {tuple(p.shape)} has {n} NaN or infinite values; the "
                                       f"checkpoint is corrupted: restore it (valid: finite weights only)")


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (name, dtype, shape and raw bytes)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        data = t.detach().cpu().contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
