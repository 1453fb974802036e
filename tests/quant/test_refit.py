"""The 1-bit scale refit: Hessian-weighted least squares for GPTQ's fixed signs."""

import itertools

import numpy as np
import pytest
import torch

from mcmoe_vl.quant.gptq import gptq_quantize, hessian_from_inputs, output_error, prepare_inverse
from mcmoe_vl.quant.quantizer import BinaryQuantizer, get_quantizer, refit_binary_scales, weighted_error
from tiny import correlated

from model_adapters import get_adapter


def _brute_force(w: np.ndarray, b: np.ndarray, h: np.ndarray, g: int, grid: np.ndarray) -> np.ndarray:
    """Per row, the grid point (one scale per group) with the least (w - M s)^T H (w - M s), float64."""
    r, c = w.shape
    n_groups = c // g
    best = np.zeros((r, n_groups))
    for row in range(r):
        err_best = np.inf
        for s in itertools.product(grid, repeat=n_groups):
            d = w[row] - np.repeat(np.asarray(s), g) * b[row]
            e = d @ h @ d
            if e < err_best:
                err_best, best[row] = e, s
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_is_the_weighted_least_squares_optimum(seed):
    """Two groups of 3 columns, float64: the closed form equals a brute-force grid search, and an explicit solve."""
    rng = np.random.default_rng(seed)
    r, g, c = 4, 3, 6
    w = rng.normal(size=(r, c)) * 0.1
    x = rng.normal(size=(50, c)) @ (np.eye(c) + 0.5 * rng.normal(size=(c, c)))
    h = 2 * x.T @ x / 50
    codes = (rng.random((r, c)) < 0.5).astype(np.uint8)  # arbitrary fixed signs, not just sign(w)
    codes[:, 0] = (w[:, 0] >= 0)
    b = codes * 2.0 - 1
    start = torch.full((r, c // g), 1e-3, dtype=torch.float64)
    got = refit_binary_scales(torch.tensor(w), torch.tensor(codes), start, torch.tensor(h), group_size=g,
                              param_dtype=torch.float64).double().numpy()
    # explicit least squares on H^(1/2) (an independent formulation)
    evals, evecs = np.linalg.eigh(h)
    root = evecs @ np.diag(np.sqrt(evals)) @ evecs.T
    for row in range(r):
        m = np.zeros((c, c // g))
        for j in range(c // g):
            m[j * g : (j + 1) * g, j] = b[row, j * g : (j + 1) * g]
        s, *_ = np.linalg.lstsq(root @ m, root @ w[row], rcond=None)
        np.testing.assert_allclose(got[row], s, rtol=1e-6, atol=1e-9)
    # brute force: a fine grid around the optimum never beats it, and its best point is next to it
    lo, hi = got.min() - 0.05, got.max() + 0.05
    grid = np.linspace(lo, hi, 201)
    bf = _brute_force(w, b, h, g, grid)
    step = grid[1] - grid[0]
    assert np.abs(bf - got).max() <= step
    for row in range(r):
        def err(s):
            d = w[row] - np.repeat(s, g) * b[row]
            return d @ h @ d
        assert err(got[row]) <= err(bf[row]) + 1e-12


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_refit_never_increases_the_weighted_error(seed, act_order, static):
    w, x = correlated(48, 256, 600, seed)
    h = hessian_from_inputs(x, dtype=torch.float64)
    inv = prepare_inverse(h, act_order=act_order, dtype=torch.float64)
    plain = gptq_quantize(w, inv, BinaryQuantizer(), group_size=64, static_groups=static)
    refit = gptq_quantize(w, inv, BinaryQuantizer(refit=True), group_size=64, static_groups=static)
    assert torch.equal(plain.codes, refit.codes)  # storage: same signs, same layout, only scales differ
    assert refit.scale.shape == plain.scale.shape and refit.zero is None
    e_plain = weighted_error(w.double(), plain.weight.double(), h)
    e_refit = weighted_error(w.double(), refit.weight.double(), h)
    assert (e_refit <= e_plain * (1 + 1e-12)).all()
    assert e_refit.sum() < 0.98 * e_plain.sum()  # not vacuous: the refit really helps here
    # the scales are what the checkpoint stores: 16-bit values
    assert torch.equal(refit.scale, refit.scale.half().float())
    # the dequantized weight is the storage formula s * (2q - 1) in storage order
    deq = refit.scale.repeat_interleave(64, dim=1) * (refit.codes.float() * 2 - 1)
    nat = deq if refit.perm is None else torch.empty_like(deq).index_copy_(1, refit.perm, deq)
    assert torch.equal(nat, refit.weight)


def test_refit_lowers_the_output_error_and_is_an_option():
    w, x = correlated(64, 256, 800, 7)
    inv = prepare_inverse(hessian_from_inputs(x))
    base = output_error(w, gptq_quantize(w, inv, get_quantizer(1), group_size=128).weight, x)
    better = output_error(w, gptq_quantize(w, inv, get_quantizer(1, refit_1bit=True), group_size=128).weight, x)
    assert better < 0.97 * base  # Gaussian weights: a modest gain (trained experts gain far more, docs/pmq.md)
    assert not get_quantizer(1).refit  # the paper's binarisation stays the default
    assert get_quantizer(2, refit_1bit=True).bits == 2  # the option only concerns 1 bit


def test_engine_follows_the_plans_refit_unless_told():
    """A plan with refit_1bit quantizes its 1-bit experts with refit scales (same codes); the config overrides it."""
    from tiny import batches, tiny_mixtral_q

    from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
    from mcmoe_vl.quant.plan import BitPlan

    torch.set_num_threads(1)
    experts = {0: [1, 2, 1, 3], 1: [1, 1, 2, 2]}

    def one_bit_expert(plan_refit: bool, cfg_refit: bool | None):
        model = tiny_mixtral_q()
        plan = BitPlan.from_experts(experts, refit_1bit=plan_refit)
        quantize_model(model, plan, batches(2), QuantizeConfig(progress=False, min_tokens=0, refit_1bit=cfg_refit),
                       adapter=get_adapter(model))
        return model.model.layers[0].mlp.experts.experts[0].gate_up.packed

    paper, refit, forced_off = one_bit_expert(False, None), one_bit_expert(True, None), one_bit_expert(True, False)
    assert torch.equal(paper.qdata, refit.qdata)  # storage unchanged: the same signs
    assert not torch.equal(paper.scale, refit.scale)
    assert torch.equal(paper.scale, forced_off.scale)
