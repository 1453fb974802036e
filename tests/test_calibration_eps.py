"""The eps table equals the brute-force full-block difference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_calibration import block_inputs, make_batches
from tiny_models import tiny_deepseek_v2

from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.calibration.eps import WeightsExpert, quantize_expert, rtn_quantizer
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


def test_eps_quantizer_is_the_engines_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, generator=g)
    q = rtn_quantizer(128)
    errs = [float((q(w, b) - w).pow(2).sum()) for b in (1, 2, 3, 4)]
    assert errs[0] > errs[1] > errs[2] > errs[3] > 0
    for c0 in (0, 128):  # 1 bit: +-mean|W| per (row, group), the scale rounded to 16 bits
        grp = w[:, c0 : c0 + 128]
        s = grp.abs().mean(dim=1, keepdim=True)
        torch.testing.assert_close(q(w, 1)[:, c0 : c0 + 128], torch.where(grp >= 0, s, -s), rtol=1e-3, atol=0)
        assert all(torch.unique(q(w, 2)[r, c0 : c0 + 128]).numel() <= 4 for r in range(4))
