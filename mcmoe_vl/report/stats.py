"""Uncertainty of a score and paired comparisons of two recipes, from per-item outputs.

A task's items are its documents; each recipe has the same documents (same ``doc_hash``) for every calibration seed.
``values`` below is an array of shape (S, n) for mean-aggregated metrics (accuracy, exact match) or (S, n, 2) for
the weighted perplexities (per document: log-likelihood and its count of bytes / words), S seeds by n documents.

- :func:`score`: the harness's aggregate per seed (mean; ``exp(-sum ll / sum count)`` for word / byte perplexity,
  ``-sum ll / (sum count * ln 2)`` for bits per byte), then the mean over seeds.
- lm-eval's ``perplexity`` (per-item log-likelihoods): ``exp(-mean)``.
- :func:`standard_error` (mean metrics): with one seed the standard error of the mean over items,
  ``sd(x, ddof=1) / sqrt(n)`` (lm-eval's ``mean_stderr``); with S seeds the standard error of the seed-averaged
  score, ``sqrt(se_items(seed-averaged item values)^2 + var_seeds(per-seed scores) / S)``: item noise plus the
  calibration-seed spread.
- :func:`bootstrap_interval`: a percentile interval from resampling documents (and, with several seeds, seeds).
- :func:`paired_difference`: the difference of two recipes on the same documents. Each resample draws one set of
  document indices shared by both recipes (the pairing) and, for each recipe separately, its seeds with replacement
  (so the seed spread widens the interval); the difference's percentile interval at ``confidence`` is reported, and
  the difference is marked significant when the interval excludes 0. Perplexities are compared as a relative
  difference, ``100 * (ppl_a / ppl_b - 1)`` percent.

Resampling uses a generator seeded from a name (:func:`rng_for`), so the same files always give the same numbers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

RATIO_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def is_ratio(metric: str) -> bool:
    """Metrics aggregated as a ratio of sums over documents (values carry [loglikelihood, count])."""
    return metric.split(",", 1)[0] in RATIO_METRICS


def is_perplexity(metric: str) -> bool:
    """Perplexity-like metrics: shown with a bootstrap interval and compared as a relative difference. Besides the
    ratio metrics, lm-eval's ``perplexity`` (``exp(-mean loglikelihood)`` over items)."""
    return is_ratio(metric) or metric.split(",", 1)[0] == "perplexity"


def rng_for(*names: str) -> np.random.Generator:
    """A generator whose seed is a hash of ``names`` (the same comparison always resamples the same way)."""
    digest = hashlib.sha256("\x1f".join(names).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _aggregate(metric: str, values: np.ndarray, axis: int) -> np.ndarray:
    """Aggregate over the item axis ``axis``. Ratio metrics carry a last axis of 2: log-likelihood, count."""
    name = metric.split(",", 1)[0]
    if name == "perplexity":
        return np.exp(-values.mean(axis=axis))
    if not is_ratio(metric):
        return values.mean(axis=axis)
    ll = values[..., 0].sum(axis=axis)
    cnt = values[..., 1].sum(axis=axis)
    if name == "bits_per_byte":
        return -ll / (cnt * math.log(2))
    return np.exp(-ll / cnt)


def per_seed_scores(metric: str, values: np.ndarray) -> np.ndarray:
    """(S,) the harness's aggregate of each seed."""
    return _aggregate(metric, np.asarray(values, dtype=np.float64), axis=1)


def score(metric: str, values: np.ndarray) -> float:
    """The mean over seeds of the harness's aggregate."""
    return float(per_seed_scores(metric, values).mean())


def standard_error(values: np.ndarray) -> float:
    """Standard error of a mean-aggregated score (see the module docstring); ``values`` is (S, n)."""
    v = np.asarray(values, dtype=np.float64)
    s, n = v.shape
    if n < 2:
        return float("nan")
    item_var = v.mean(axis=0).var(ddof=1) / n
    seed_var = v.mean(axis=1).var(ddof=1) / s if s > 1 else 0.0
    return float(math.sqrt(item_var + seed_var))


def _resampled(metric: str, values: np.ndarray, idx: np.ndarray, seed_idx: np.ndarray) -> np.ndarray:
    """(B,) the score of each resample: documents ``idx`` (B, n), seeds ``seed_idx`` (B, S)."""
    v = np.asarray(values, dtype=np.float64)
    per_seed = _aggregate(metric, v[:, idx], axis=2)  # (S, B): every seed on every resample of documents
    b = np.arange(idx.shape[0])[:, None]
    return per_seed[seed_idx, b].mean(axis=1)  # (B,): mean over the resampled seeds


def _draw(rng: np.random.Generator, n: int, s: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.integers(0, n, size=(b, n))
    seed_idx = rng.integers(0, s, size=(b, s)) if s > 1 else np.zeros((b, 1), dtype=np.int64)
    return idx, seed_idx


def bootstrap_interval(metric: str, values: np.ndarray, *, confidence: float, iters: int,
                       rng: np.random.Generator) -> tuple[float, float]:
    """Percentile interval of the score over resampled documents (and seeds)."""
    v = np.asarray(values, dtype=np.float64)
    idx, seed_idx = _draw(rng, v.shape[1], v.shape[0], iters)
    boot = _resampled(metric, v, idx, seed_idx)
    a = (1.0 - confidence) / 2
    lo, hi = np.quantile(boot, [a, 1.0 - a])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Difference:
    """``a - b`` (accuracy-like: in the metric's units; perplexity: percent of b) with its interval."""

    estimate: float
    low: float
    high: float
    n: int
    relative: bool

    @property
    def significant(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def _diff(metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 100.0 * (a / b - 1.0) if is_perplexity(metric) else a - b


def paired_difference(metric: str, a: np.ndarray, b: np.ndarray, *, confidence: float, iters: int,
                      rng: np.random.Generator) -> Difference:
    """Paired bootstrap of ``score(a) - score(b)`` over shared documents (see the module docstring).

    ``a`` and ``b`` hold the same documents in the same order on axis 1 (any numbers of seeds on axis 0).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired values need the same documents: {a.shape[1]} vs {b.shape[1]}")
    n = a.shape[1]
    idx = rng.integers(0, n, size=(iters, n))
    sa = rng.integers(0, a.shape[0], size=(iters, a.shape[0]))
    sb = rng.integers(0, b.shape[0], size=(iters, b.shape[0]))
    boot = _diff(metric, _resampled(metric, a, idx, sa), _resampled(metric, b, idx, sb))
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    est = float(_diff(metric, np.float64(score(metric, a)), np.float64(score(metric, b))))
    return Difference(estimate=est, low=float(lo), high=float(hi), n=n, relative=is_perplexity(metric))


def paired_average_difference(tasks: list[tuple[str, np.ndarray, np.ndarray]], *, confidence: float, iters: int,
                              rng: np.random.Generator, scale: float = 100.0) -> Difference:
    """Paired bootstrap of the difference of the average over several mean-aggregated tasks (x ``scale``).

    Each task's documents are resampled separately (tasks are independent sets of items)."""
    boots = []
    est = 0.0
    for metric, a, b in tasks:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        n = a.shape[1]
        idx = rng.integers(0, n, size=(iters, n))
        sa = rng.integers(0, a.shape[0], size=(iters, a.shape[0]))
        sb = rng.integers(0, b.shape[0], size=(iters, b.shape[0]))
        boots.append(_resampled(metric, a, idx, sa) - _resampled(metric, b, idx, sb))
        est += score(metric, a) - score(metric, b)
    boot = scale * np.mean(boots, axis=0)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    n = min(np.asarray(a).shape[1] for _, a, _ in tasks)
    return Difference(estimate=scale * est / len(tasks), low=float(lo), high=float(hi), n=n, relative=False)
