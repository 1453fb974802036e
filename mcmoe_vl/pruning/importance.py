"""Token importance for ODP's token protection (MC-MoE paper Eq. 6, METHOD.md section 6).

For a sequence of ``L`` valid tokens and the causal attention map ``A`` of a decoder layer (averaged over heads)::

    I_j = ||t_j||_1 * (sum_{i >= j} A[i, j]) / (L - j)

the attention key token ``j`` receives from the queries that can see it (a *column* mean of the causal map), times
the L1 norm of the token's MoE input ``t_j``. With padding, only valid queries are summed and the divisor is the
number of valid queries allowed to attend to ``j`` (``L - j`` for causal attention, ``j`` counted among the valid
tokens of its own sequence), so a padded batch gives every sequence the importance it has alone.

Only the column sums are needed, never the full map. :class:`AttentionColumnCapture` gets them from the attention
module of selected decoder layers without changing what the model computes:

- it gives each selected attention module a private copy of its config whose attention implementation is a
  registered wrapper; the wrapper calls the model's own implementation (eager, sdpa, flash, ...) for the output;
- with eager attention the probabilities are already there and are summed over queries (``O(B h L^2)`` adds);
- otherwise the exact column sums of ``softmax(Q K^T * scaling + mask)`` are recomputed from the post-RoPE query
  and key in chunks of queries (memory ``B * h * chunk * L``), without ever holding the whole map.

Layers without protection pay nothing: their attention modules are untouched. Pure functions
(:func:`attention_column_stats`, :func:`column_stats_from_probs`, :func:`token_importance`,
:func:`protection_mask`) work on tensors alone.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

CAPTURE_IMPLEMENTATION = "mcmoe_vl_column_capture"  # the name registered in transformers' AttentionInterface
_STATE_ATTR = "_mcmoe_vl_column_capture"


class ProtectScope(str, enum.Enum):
    """Over which tokens the top ``protect_ratio`` are chosen."""

    SEQUENCE = "sequence"  # top ratio of each sequence's valid tokens (independent of the batch it is in)
    BATCH = "batch"  # top ratio of all valid tokens of the batch


@dataclass
class ColumnStats:
    """What one attention call contributes to Eq. 6 for the tokens it processed (the ``Q`` new tokens).

    ``colsum[b, j]``: attention received by new token j from the valid queries of the call, summed over queries and
    averaged over heads; ``count[b, j]``: how many valid queries were allowed to attend to it; ``valid[b, j]``:
    whether token j is a real token (not padding). ``prefill`` is False for single-token decoding steps, where only
    the ratio rule applies.
    """

    colsum: torch.Tensor  # (B, Q) float32
    count: torch.Tensor  # (B, Q) float32
    valid: torch.Tensor  # (B, Q) bool
    prefill: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)  # type: ignore[return-value]


# -- pure functions --------------------------------------------------------------------------------------------------
def _allowed(
    mask: torch.Tensor | None, B: int, rows: slice, Q: int, K: int, device: torch.device
) -> torch.Tensor:
    """Bool (B, 1|h, c, K): may query row ``i`` (of ``rows``) attend key ``j``. ``mask`` is the model's mask."""
    offset = K - Q  # new tokens are the last Q keys (no cache or a dynamic cache)
    if mask is None:  # causal, no padding
        qpos = torch.arange(rows.start, rows.stop, device=device)[:, None] + offset  # (c, 1)
        kpos = torch.arange(K, device=device)[None, :]  # (1, K)
        return (kpos <= qpos)[None, None].expand(B, 1, -1, -1)
    if mask.dim() == 2:  # (B, K) key padding mask (flash-attention style), causality implicit
        qpos = torch.arange(rows.start, rows.stop, device=device)[:, None] + offset
        kpos = torch.arange(K, device=device)[None, :]
        causal = (kpos <= qpos)[None, None]  # (1, 1, c, K)
        return causal & mask.bool()[:, None, None, :]
    if mask.dim() != 4:
        raise ValueError(f"unsupported attention mask of shape {tuple(mask.shape)}; expected (B, 1|h, Q, K) or (B, K)")
    m = mask[:, :, rows, -K:] if mask.shape[-1] >= K else mask[:, :, rows]
    if m.dtype == torch.bool:
        return m
    # Additive float mask: 0 where allowed, a large negative number (or -inf) where not.
    return m > torch.finfo(m.dtype).min / 2


def _diagonal_valid(mask: torch.Tensor | None, B: int, Q: int, K: int, device: torch.device) -> torch.Tensor:
    """(B, Q) bool: a token is real iff it may attend to itself (padding is masked as a key for every query)."""
    if mask is None:
        return torch.ones(B, Q, dtype=torch.bool, device=device)
    if mask.dim() == 2:
        return mask[:, K - Q :].bool().expand(B, Q)
    allowed = _allowed(mask, mask.shape[0], slice(0, Q), Q, K, device)[:, 0]  # (B|1, Q, K)
    idx = torch.arange(Q, device=device) + (K - Q)
    diag = allowed[:, torch.arange(Q, device=device), idx]  # (B|1, Q)
    return diag.expand(B, Q)


def attention_column_stats(
    query: torch.Tensor,  # (B, h, Q, d) post-RoPE queries of the new tokens
    key: torch.Tensor,  # (B, h_kv, K, d) keys (cache included), h a multiple of h_kv
    mask: torch.Tensor | None,  # the model's mask: (B|1, 1|h, Q, K) bool or additive float, (B, K), or None (causal)
    scaling: float,
    *,
    softcap: float | None = None,
    chunk_size: int = 512,
) -> ColumnStats:
    """Exact Eq. 6 column statistics of ``softmax(Q K^T * scaling + mask)`` for the new tokens, in query chunks.

    Never holds more than ``B * h * chunk_size * K`` probabilities. Heads are grouped as the model groups them
    (grouped-query attention: query head ``g * h_kv + ...`` shares key head ``g``, like ``repeat_kv``).
    """
    B, h, Q, d = query.shape
    hk, K = key.shape[1], key.shape[2]
    if h % hk:
        raise ValueError(f"{h} query heads are not a multiple of {hk} key heads")
    if K < Q:
        raise ValueError(f"fewer keys ({K}) than queries ({Q})")
    g = h // hk
    device = query.device
    offset = K - Q
    valid = _diagonal_valid(mask, B, Q, K, device)  # (B, Q)
    colsum = torch.zeros(B, h, Q, dtype=torch.float32, device=device)
    count = torch.zeros(B, Q, dtype=torch.float32, device=device)
    kt = key.float().transpose(-1, -2)  # (B, hk, d, K)
    neg = torch.finfo(torch.float32).min  # finite: a fully masked (padding) row stays finite and is weighted 0
    chunk_size = max(1, int(chunk_size))
    for s in range(0, Q, chunk_size):
        rows = slice(s, min(Q, s + chunk_size))
        c = rows.stop - rows.start
        # Pure causal (no mask): keys after the chunk's last query are masked for all of it; skip them.
        k_end = offset + rows.stop if mask is None else K
        q = query[:, :, rows].float().reshape(B, hk, g * c, d)  # heads grouped like repeat_kv: h = kv * g + j
        scores = (q @ kt[..., :k_end]).reshape(B, h, c, k_end)  # (B, h, c, k_end)
        scores.mul_(scaling)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if mask is None:  # causal: key j is hidden from query i iff j > offset + i
            qpos = torch.arange(rows.start, rows.stop, device=device)[:, None] + offset
            hidden = torch.arange(k_end, device=device)[None, :] > qpos  # (c, k_end)
            scores.masked_fill_(hidden, neg)
        else:
            allowed = _allowed(mask, B, rows, Q, K, device)[..., :k_end]  # (B|1, 1|h, c, k_end)
            scores.masked_fill_(allowed.logical_not(), neg)
            vq = valid[:, None, rows].float()  # (B, 1, c)
            count += (vq @ allowed[:, 0, :, offset:].float()).squeeze(1)  # (B, Q) valid queries that see j
        probs = torch.softmax(scores, dim=-1)[..., offset:]  # (B, h, c, n) the new tokens' columns
        n_new = k_end - offset
        if mask is None:
            colsum[..., :n_new] += probs.sum(dim=2)
        else:  # only real queries count
            colsum[..., :n_new] += (probs * valid[:, None, rows, None].float()).sum(dim=2)
    if mask is None:  # every token real, key j seen by the Q - j queries at or after it
        count = (Q - torch.arange(Q, device=device, dtype=torch.float32)).expand(B, Q).clone()
    return ColumnStats(colsum=colsum.mean(dim=1), count=count, valid=valid, prefill=Q > 1)


def column_stats_from_probs(
    probs: torch.Tensor,  # (B, h, Q, K) attention probabilities as the model computed them
    mask: torch.Tensor | None,
) -> ColumnStats:
    """Eq. 6 column statistics from an already computed attention map (eager attention)."""
    B, h, Q, K = probs.shape
    device = probs.device
    valid = _diagonal_valid(mask, B, Q, K, device)
    vq = valid[:, None, :, None].float()  # (B, 1, Q, 1)
    colsum = (probs[..., K - Q :].float() * vq).sum(dim=2).mean(dim=1)  # (B, Q)
    allowed = _allowed(mask, B, slice(0, Q), Q, K, device)[:, 0, :, K - Q :]  # (B, Q, Q)
    count = (allowed.float() * vq[:, 0]).sum(dim=1)  # (B, Q)
    return ColumnStats(colsum=colsum, count=count, valid=valid, prefill=Q > 1)


def token_importance(hidden: torch.Tensor, stats: ColumnStats) -> torch.Tensor:
    """Eq. 6: ``I_j = ||t_j||_1 * colsum_j / count_j``; ``hidden`` (B, S, H) is the MoE input. Padding gets -inf."""
    if tuple(hidden.shape[:2]) != stats.shape:
        raise ValueError(f"MoE input of shape {tuple(hidden.shape)} does not match attention stats {stats.shape}")
    l1 = hidden.float().abs().sum(dim=-1)  # (B, S)
    mean_att = stats.colsum / stats.count.clamp_min(1.0)  # (B, S) column mean over the queries that see j
    imp = l1 * mean_att
    return imp.masked_fill(~stats.valid, float("-inf"))


def protection_mask(
    importance: torch.Tensor,  # (B, S), -inf on padding
    valid: torch.Tensor,  # (B, S) bool
    ratio: float,
    scope: ProtectScope = ProtectScope.SEQUENCE,
) -> torch.Tensor:
    """(B, S) bool: the ``ceil(ratio * n)`` most important valid tokens (n per sequence, or per batch).

    ``ratio = 0`` protects nothing; any positive ratio protects at least one token of each non-empty group.
    Ties are broken by position (``topk`` order), deterministically.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"protect ratio must be in [0, 1], got {ratio}")
    out = torch.zeros_like(valid, dtype=torch.bool)
    if ratio == 0.0 or importance.numel() == 0:
        return out
    if scope is ProtectScope.BATCH:
        n = int(valid.sum())
        m = math.ceil(ratio * n) if n else 0
        if m:
            top = importance.reshape(-1).topk(m).indices
            out.view(-1)[top] = True
        return out & valid
    n_valid = valid.sum(dim=1)  # (B,)
    m = torch.ceil(n_valid.double() * ratio).long()  # (B,)
    mmax = int(m.max())
    if mmax == 0:
        return out
    top = importance.topk(min(mmax, importance.shape[1]), dim=1).indices  # (B, mmax)
    take = torch.arange(top.shape[1], device=top.device)[None, :] < m[:, None]  # (B, mmax)
    out.scatter_(1, top, take)
    return out & valid


# -- capturing column sums from a running model ----------------------------------------------------------------------
class _CaptureState:
    """Per attention module: the original implementation and the latest column statistics."""

    def __init__(self, layer_index: int, original: str | None, eager: Callable[..., Any] | None, chunk: int) -> None:
        self.layer_index = layer_index
        self.original = original or "eager"
        self.eager = eager
        self.chunk = chunk
        self.latest: ColumnStats | None = None
        self.calls = 0


def _capturing_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Registered attention implementation: the module's own implementation, plus Eq. 6 column statistics."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state: _CaptureState | None = module.__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError(f"{CAPTURE_IMPLEMENTATION} was called on an attention module without a capture installed")
    if state.original == "eager":
        if state.eager is None:
            raise RuntimeError("no eager attention function known for this module")
        impl = state.eager
    else:
        impl = ALL_ATTENTION_FUNCTIONS.get_interface(state.original, state.eager)
    out, weights = impl(module, query, key, value, attention_mask, **kwargs)
    with torch.no_grad():
        B, h, Q, _ = query.shape
        K = key.shape[2]
        if isinstance(weights, torch.Tensor) and tuple(weights.shape) == (B, h, Q, K):
            stats = column_stats_from_probs(weights, attention_mask)
        elif Q == 1:  # decoding: no protection, nothing to compute
            stats = ColumnStats(torch.zeros(B, 1), torch.zeros(B, 1), torch.ones(B, 1, dtype=torch.bool), False)
        else:
            scaling = kwargs.get("scaling")
            scaling = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
            stats = attention_column_stats(query, key, attention_mask, scaling, softcap=kwargs.get("softcap"),
                                           chunk_size=state.chunk)
    state.latest = stats
    state.calls += 1
    return out, weights


def _register_capture_implementation() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if CAPTURE_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_attention)


class AttentionColumnCapture:
    """Capture Eq. 6 column statistics from the self-attention of the given decoder layers.

    ``attentions``: decoder layer index -> that layer's self-attention module (``MoELayer.attention``). Install
    with ``with capture:`` or :meth:`install` / :meth:`remove`; :meth:`pop` hands the latest statistics of a layer
    to its MoE block (which runs after the attention in the same decoder layer) and clears them.
    """

    def __init__(self, attentions: dict[int, nn.Module], *, chunk_size: int = 512) -> None:
        for idx, att in attentions.items():
            if att is None or not hasattr(att, "config"):
                raise ValueError(f"decoder layer {idx}: no self-attention module with a config to capture from")
        self.attentions = dict(attentions)
        self.chunk_size = chunk_size
        self._saved: dict[int, tuple[nn.Module, Any]] = {}

    @classmethod
    def for_layers(cls, layers: Sequence[Any], *, chunk_size: int = 512) -> AttentionColumnCapture:
        """From :class:`mcmoe_vl.moe.MoELayer` objects (their ``attention`` modules)."""
        return cls({la.index: la.attention for la in layers}, chunk_size=chunk_size)

    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def install(self) -> AttentionColumnCapture:
        if self._saved:
            return self
        _register_capture_implementation()
        for idx, att in self.attentions.items():
            if _STATE_ATTR in att.__dict__:
                raise RuntimeError(f"decoder layer {idx}: an attention capture is already installed")
            original = att.config._attn_implementation
            eager = getattr(sys.modules.get(type(att).__module__), "eager_attention_forward", None)
            if (original or "eager") == "eager" and eager is None:
                raise ValueError(f"{type(att).__name__}: eager attention but no eager_attention_forward in its module")
            private = copy.copy(att.config)  # shallow: only this module sees the capturing implementation
            private.__dict__["_attn_implementation_internal"] = CAPTURE_IMPLEMENTATION
            self._saved[idx] = (att, att.config)
            att.__dict__[_STATE_ATTR] = _CaptureState(idx, original, eager, self.chunk_size)
            att.config = private
        return self

    def remove(self) -> None:
        for att, config in self._saved.values():
            att.config = config
            att.__dict__.pop(_STATE_ATTR, None)
        self._saved.clear()

    def __enter__(self) -> AttentionColumnCapture:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def pop(self, layer_index: int) -> ColumnStats | None:
        """The statistics of the latest attention call of decoder layer ``layer_index`` (then cleared)."""
        att = self.attentions.get(layer_index)
        state: _CaptureState | None = None if att is None else att.__dict__.get(_STATE_ATTR)
        if state is None:
            return None
        stats, state.latest = state.latest, None
        return stats
