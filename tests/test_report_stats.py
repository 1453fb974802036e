"""The report's statistics: standard errors against a direct computation, paired-bootstrap coverage in simulation,
no false marks at a true difference of 0, determinism."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from mcmoe_vl.report import stats

SAMPLE = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1]  # a fixed small sample of 0/1 outcomes


def test_standard_error_equals_a_direct_computation() -> None:
    direct = statistics.stdev(SAMPLE) / math.sqrt(len(SAMPLE))
    assert stats.standard_error(np.array([SAMPLE])) == pytest.approx(direct, rel=1e-12)
    assert stats.score("acc,none", np.array([SAMPLE])) == pytest.approx(statistics.fmean(SAMPLE))
    # several seeds: item noise of the seed-averaged values plus the seed spread of the per-seed scores
    seeds = [SAMPLE, SAMPLE[::-1], [1] * 6 + [0] * 6]
    avg = [statistics.fmean(col) for col in zip(*seeds)]
    per_seed = [statistics.fmean(s) for s in seeds]
    direct3 = math.sqrt(statistics.variance(avg) / len(avg) + statistics.variance(per_seed) / 3)
    assert stats.standard_error(np.array(seeds, dtype=float)) == pytest.approx(direct3, rel=1e-12)
    assert direct3 > 0


def test_ratio_metrics_aggregate_like_the_harness() -> None:
    docs = [[-30.0, 10.0], [-12.5, 4.0], [-80.0, 31.0]]  # (log-likelihood, bytes) per document
    ll, n = sum(d[0] for d in docs), sum(d[1] for d in docs)
    v = np.array([docs])
    assert stats.score("byte_perplexity,none", v) == pytest.approx(math.exp(-ll / n), rel=1e-12)
    assert stats.score("word_perplexity", v) == pytest.approx(math.exp(-ll / n), rel=1e-12)
    assert stats.score("bits_per_byte,none", v) == pytest.approx(-ll / n / math.log(2), rel=1e-12)
    # lm-eval's "perplexity" (loglikelihood tasks): exp of minus the mean per-item log-likelihood, compared relatively
    lls = np.array([[-1.0, -2.0, -4.5]])
    assert stats.score("perplexity,none", lls) == pytest.approx(math.exp(2.5), rel=1e-12)
    d = stats.paired_difference("perplexity", lls - 0.1, lls, confidence=0.95, iters=200, rng=stats.rng_for("p"))
    assert d.relative and d.estimate == pytest.approx(100 * (math.exp(0.1) - 1), rel=1e-9)


def test_perplexity_interval_is_deterministic_and_brackets_the_score() -> None:
    rng = np.random.default_rng(1)
    v = np.stack([-rng.uniform(50, 150, size=(1, 60)), rng.integers(40, 80, size=(1, 60)).astype(float)], axis=-1)
    a = stats.bootstrap_interval("byte_perplexity", v, confidence=0.95, iters=1000, rng=stats.rng_for("x", "t"))
    b = stats.bootstrap_interval("byte_perplexity", v, confidence=0.95, iters=1000, rng=stats.rng_for("x", "t"))
    c = stats.bootstrap_interval("byte_perplexity", v, confidence=0.95, iters=1000, rng=stats.rng_for("y", "t"))
    assert a == b and a != c
    assert a[0] < stats.score("byte_perplexity", v) < a[1]


def _paired_sample(rng: np.random.Generator, n: int, p_both: float, p_a: float, p_b: float) -> tuple[np.ndarray, ...]:
    """n items: both right (p_both), only A right (p_a), only B right (p_b), neither (rest); true diff p_a - p_b."""
    kind = rng.choice(4, size=n, p=[p_both, p_a, p_b, 1 - p_both - p_a - p_b])
    a = ((kind == 0) | (kind == 1)).astype(float)[None, :]
    b = ((kind == 0) | (kind == 2)).astype(float)[None, :]
    return a, b


@pytest.mark.parametrize("true_diff", [0.0, 0.08])
def test_paired_interval_covers_the_true_difference_at_its_nominal_rate(true_diff: float) -> None:
    rng = np.random.default_rng(0)
    sims, covered, marked = 400, 0, 0
    p_b = 0.10
    for i in range(sims):
        a, b = _paired_sample(rng, 300, 0.55, p_b + true_diff, p_b)
        d = stats.paired_difference("acc", a, b, confidence=0.95, iters=800, rng=stats.rng_for("sim", str(i)))
        covered += d.low <= true_diff <= d.high
        marked += d.significant
    coverage = covered / sims
    # nominal 95%: the binomial standard error of the rate over 400 simulations is about 1.1 points
    assert 0.915 <= coverage <= 0.985, coverage
    if true_diff == 0.0:
        assert marked / sims <= 0.085, marked / sims  # a true difference of 0 is marked at about 5%
    else:
        assert marked / sims >= 0.6  # not vacuous: a real 8-point difference at n=300 is usually found (~75%)


def test_seed_spread_widens_the_paired_interval() -> None:
    """Three calibration seeds whose scores differ: the interval uses their spread, one seed's does not."""
    rng = np.random.default_rng(3)
    base, _ = _paired_sample(rng, 400, 0.6, 0.0, 0.0)
    seeds = np.stack([np.where(rng.random(400) < 0.08 * k, 1 - base[0], base[0]) for k in range(3)])
    one = stats.paired_difference("acc", seeds[:1], base, confidence=0.95, iters=2000, rng=stats.rng_for("s"))
    three = stats.paired_difference("acc", seeds, base, confidence=0.95, iters=2000, rng=stats.rng_for("s"))
    assert three.high - three.low > one.high - one.low
    assert three.estimate == pytest.approx(float(seeds.mean() - base.mean()))


def test_identical_recipes_are_not_marked() -> None:
    rng = np.random.default_rng(5)
    a, _ = _paired_sample(rng, 200, 0.5, 0.1, 0.1)
    d = stats.paired_difference("acc", a, a.copy(), confidence=0.95, iters=500, rng=stats.rng_for("same"))
    assert (d.estimate, d.low, d.high, d.significant) == (0.0, 0.0, 0.0, False)
    docs = np.stack([-rng.uniform(50, 150, size=(1, 30)), np.full((1, 30), 60.0)], axis=-1)
    dp = stats.paired_difference("byte_perplexity", docs, docs.copy(), confidence=0.95, iters=500,
                                 rng=stats.rng_for("same-ppl"))
    assert dp.relative and not dp.significant and dp.estimate == pytest.approx(0.0, abs=1e-12)


def test_perplexity_difference_is_relative_and_paired_by_document() -> None:
    """B is A with every document 3% less likely per byte: the relative difference is found, tightly, because
    documents are paired (their own difficulty cancels)."""
    rng = np.random.default_rng(7)
    ll = -rng.uniform(20, 400, size=(1, 80))  # documents of very different difficulty
    cnt = np.full((1, 80), 100.0)
    a = np.stack([ll, cnt], axis=-1)
    b = np.stack([ll + cnt * math.log(1.03), cnt], axis=-1)  # per-byte likelihood x 1.03 -> ppl / 1.03
    d = stats.paired_difference("byte_perplexity", a, b, confidence=0.95, iters=1000, rng=stats.rng_for("ppl"))
    assert d.estimate == pytest.approx(3.0, rel=1e-9)
    assert d.significant and d.high - d.low < 1e-6  # exact pairing: no document noise left
