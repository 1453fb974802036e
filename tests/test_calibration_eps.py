"""The eps table equals the brute-force full-block difference; the round-to-nearest quantizer behaves as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_calibration import block_inputs, make_batches
from tiny_models import tiny_deepseek_v2

from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.calibration.eps import WeightsExpert, quantize_expert, rtn_quantizer
from mcmoe_vl.calibration.rtn import fake_quantize_rtn
from mcmoe_vl.moe import ExpertInterface


def test_eps_equals_full_block_difference():
    """eps_{i,j} = sum_b ||F(x_b) - F_{i->Q_j}(x_b)||_F with the whole block (routed + shared experts) re-run."""
    model = tiny_deepseek_v2(seed=4)
    batches = make_batches(seed=5, pad=False)
    bits = (1, 2, 3)
    stats = calibrate(model, batches, CalibrationConfig(eps_bits=bits, group_size=16), progress=False)
    q = rtn_quantizer(16)
    with ExpertInterface(model) as iface:
        layer = iface.layers[0]
        assert layer.shared_experts is not None
        la = stats.layer(layer.index)
        xs = block_inputs(model, batches, layer.index)
        with torch.no_grad():
            ref_out = [layer.forward_block(x) for x in xs]
            for i in range(layer.num_experts):
                for b in bits:
                    layer.set_expert(i, WeightsExpert(quantize_expert(layer.expert_weights(i), b, q),
                                                      layer.storage.act_fn))
                    brute = sum(float(torch.linalg.vector_norm((layer.forward_block(x) - y).double()))
                                for x, y in zip(xs, ref_out))
                    layer.reset_expert(i)
                    assert la.eps[str(b)][i] == pytest.approx(brute, rel=2e-3, abs=1e-6), (i, b)
    # Not vacuous: the experts received tokens, and fewer bits hurt more.
    eps = np.array([la.eps[str(b)] for b in bits])  # (widths, n)
    assert (np.asarray(la.all.counts) > 0).sum() >= 6
    assert (eps[0] > eps[1]).all() and (eps[1] >= eps[2]).all() and eps[2].max() > 0
    hawq = np.array([la.hawq[str(b)] for b in bits])
    assert (hawq[0] > hawq[2]).all()


def test_rtn_minmax_levels_and_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 300, generator=g)  # 300 = 2 full groups of 128 + a narrower group of 44
    errs = []
    for bits in (2, 3, 4):
        dq = fake_quantize_rtn(w, bits, 128)
        for c0 in (0, 128, 256):
            grp, dgrp = w[:, c0 : c0 + 128], dq[:, c0 : c0 + 128]
            for r in range(6):
                assert torch.unique(dgrp[r]).numel() <= 2**bits
                lo, hi = min(grp[r].min(), 0), max(grp[r].max(), 0)
                step = (hi - lo) / (2**bits - 1)
                assert (dgrp[r] - grp[r]).abs().max() <= step / 2 + step * 0.51  # rounding + zero-point offset
        errs.append(float((dq - w).pow(2).sum()))
    assert errs[0] > errs[1] > errs[2] > 0


def test_rtn_binarisation_is_scaled_sign():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 256, generator=g)
    dq = fake_quantize_rtn(w, 1, 128)
    for c0 in (0, 128):
        grp = w[:, c0 : c0 + 128]
        s = grp.abs().mean(dim=1, keepdim=True)
        torch.testing.assert_close(dq[:, c0 : c0 + 128], torch.where(grp >= 0, s, -s))


def test_rtn_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize_rtn(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="bits"):
        fake_quantize_rtn(torch.zeros(2, 2), 0)
