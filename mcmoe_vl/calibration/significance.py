"""Expert significance from routing decisions (METHOD.md section 1): exact counts and weight sums.

Pure tensor code: :class:`SignificanceAccumulator` takes one routing decision at a time (the ``topk_idx``,
pre-renormalisation probabilities and applied weights of T tokens, plus an optional image-token mask) and sums

- ``counts[i]``: tokens with expert i in their top-k (a layer's counts sum to ``k * N`` exactly: integer adds);
- ``weight_sum[i]``: expert i's probability before renormalisation over those tokens (float64 sums);
- ``weight_sum_renorm[i]``: the probability renormalised over the token's top-k;
- ``weight_sum_applied[i]``: the weight the model applies;
- ``w_e / w_top1`` for every selected non-top-1 expert (ODP's statistic), kept to compute quantiles.
"""

from __future__ import annotations

import numpy as np
import torch

from .stats import RatioQuantiles, TokenGroupStats


class _Group:
    def __init__(self, n: int) -> None:
        self.n = n
        self.tokens = 0
        self.counts = torch.zeros(n, dtype=torch.int64)
        self.wsum = torch.zeros(n, dtype=torch.float64)
        self.wren = torch.zeros(n, dtype=torch.float64)
        self.wapp = torch.zeros(n, dtype=torch.float64)

    def add(self, idx: torch.Tensor, prob: torch.Tensor, renorm: torch.Tensor, applied: torch.Tensor) -> None:
        # idx, prob, renorm, applied: (T, k)
        self.tokens += idx.shape[0]
        flat = idx.reshape(-1).cpu()
        self.counts += torch.bincount(flat, minlength=self.n)
        self.wsum.index_add_(0, flat, prob.reshape(-1).double().cpu())
        self.wren.index_add_(0, flat, renorm.reshape(-1).double().cpu())
        self.wapp.index_add_(0, flat, applied.reshape(-1).double().cpu())

    def result(self) -> TokenGroupStats:
        return TokenGroupStats(
            num_tokens=self.tokens,
            counts=self.counts.tolist(),
            weight_sum=self.wsum.tolist(),
            weight_sum_renorm=self.wren.tolist(),
            weight_sum_applied=self.wapp.tolist(),
        )


class SignificanceAccumulator:
    """Sums routing statistics of one MoE layer over calibration batches (all tokens, and image / text)."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        self.n, self.k = num_experts, top_k
        self.all = _Group(num_experts)
        self.image = _Group(num_experts)
        self.text = _Group(num_experts)
        self.saw_image_mask = False
        self._ratios: list[np.ndarray] = []

    def add(
        self,
        topk_idx: torch.Tensor,  # (T, k) int64
        topk_prob: torch.Tensor,  # (T, k) probabilities before renormalisation
        topk_weight: torch.Tensor,  # (T, k) weights as applied
        image_mask: torch.Tensor | None = None,  # (T,) bool
    ) -> None:
        if topk_idx.shape != topk_prob.shape or topk_idx.shape != topk_weight.shape or topk_idx.shape[1] != self.k:
            raise ValueError(f"routing shapes disagree: {tuple(topk_idx.shape)}, {tuple(topk_prob.shape)}, "
                             f"{tuple(topk_weight.shape)} for top-{self.k}")
        if topk_idx.numel() and (topk_idx.min() < 0 or topk_idx.max() >= self.n):
            raise ValueError(f"expert index out of range 0..{self.n - 1}")
        denom = topk_prob.double().sum(dim=-1, keepdim=True)
        renorm = topk_prob.double() / torch.where(denom > 0, denom, torch.ones_like(denom))
        self.all.add(topk_idx, topk_prob, renorm, topk_weight)
        if image_mask is not None:
            self.saw_image_mask = True
            m = image_mask.reshape(-1).bool().to(topk_idx.device)
            self.image.add(topk_idx[m], topk_prob[m], renorm[m], topk_weight[m])
            self.text.add(topk_idx[~m], topk_prob[~m], renorm[~m], topk_weight[~m])
        if self.k > 1 and topk_idx.shape[0]:
            w = topk_weight.double()
            top = w.argmax(dim=-1, keepdim=True)  # (T, 1) the strongest slot (slots are not sorted)
            ratio = w / w.gather(1, top).clamp_min(torch.finfo(torch.float64).tiny)
            keep = torch.ones_like(ratio, dtype=torch.bool).scatter_(1, top, False)
            self._ratios.append(ratio[keep].cpu().numpy())

    def ratio_quantiles(self, qs: tuple[float, ...]) -> RatioQuantiles | None:
        if not self._ratios:
            return None
        r = np.concatenate(self._ratios)
        if r.size == 0:
            return None
        vals = np.quantile(r, qs)
        return RatioQuantiles(count=int(r.size), mean=float(r.mean()),
                              quantiles={f"{q:.2f}": float(v) for q, v in zip(qs, vals)})

    def groups(self) -> tuple[TokenGroupStats, TokenGroupStats | None, TokenGroupStats | None]:
        if not self.saw_image_mask:
            return self.all.result(), None, None
        return self.all.result(), self.image.result(), self.text.result()
