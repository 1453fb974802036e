"""The eps table equals the brute-force full-block difference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_calibration import block_inputs, make_batches
from tiny_models import tiny_deepseek_v2

from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.calibration.eps import WeightsExpert, quantize_expert, rtn_quantizer
from model_adapters import expert_interface


def test_eps_equals_full_block_difference():
    """eps_{i,j} = sum_b ||F(x_b) - F_{i->Q_j}(x_b)||_F with the whole block (routed + shared experts) re-run."""
    model = tiny_deepseek_v2(seed=4)
    batches = make_batches(seed=5, pad=False)
    bits = (1, 2, 3)
    stats = calibrate(model, batches, CalibrationConfig(eps_bits=bits, group_size=16), progress=False)
    q = rtn_quantizer(16)
    with expert_interface(model) as iface:
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


def test_eps_from_gptq_equals_a_direct_measurement():
    """eps with the engine's GPTQ on each expert's own Hessian, re-measured directly: Hessians from the block's
    inputs and routing (float64), the engine's quantize_expert, the whole block re-run."""
    from mcmoe_vl.quant.gptq import hessian_from_inputs
    from mcmoe_vl.quant.model import QuantizeConfig
    from mcmoe_vl.quant.model import quantize_expert as engine_quantize_expert

    model = tiny_deepseek_v2(seed=4)
    batches = make_batches(seed=5, pad=False)
    bits = (1, 2, 3)
    cfg = CalibrationConfig(eps_bits=bits, group_size=16, quantizer="gptq", refit_1bit=True, min_tokens=4)
    stats = calibrate(model, batches, cfg, progress=False)
    rtn = calibrate(model, batches, CalibrationConfig(eps_bits=bits, group_size=16, min_tokens=4), progress=False)
    assert stats.config["quantizer"] == "gptq" and stats.config["refit_1bit"] is True  # recorded in the file
    qcfg = QuantizeConfig(refit_1bit=True, progress=False)
    checked = 0
    with expert_interface(model) as iface:
        layer = iface.layers[0]
        la, la_rtn = stats.layer(layer.index), rtn.layer(layer.index)
        xs = block_inputs(model, batches, layer.index)
        x_all = torch.cat(xs)
        with torch.no_grad():
            ref_out = [layer.forward_block(x) for x in xs]
            routed = layer.route(x_all).topk_idx
            for i in range(layer.num_experts):
                xe = x_all[(routed == i).any(dim=-1)].double()
                w = layer.expert_weights(i)
                w = type(w)(gate=w.gate.float(), up=w.up.float(), down=w.down.float())
                mid = torch.nn.functional.silu(xe @ w.gate.double().t()) * (xe @ w.up.double().t())
                starved = xe.shape[0] < 4
                for b in bits:
                    res = engine_quantize_expert(
                        w, b, qcfg, group_size=16, h_in=None if starved else hessian_from_inputs(xe).float(),
                        h_down=None if starved else hessian_from_inputs(mid).float())
                    q = type(w)(gate=res["gate"].weight, up=res["up"].weight, down=res["down"].weight)
                    layer.set_expert(i, WeightsExpert(q, layer.storage.act_fn))
                    direct = sum(float(torch.linalg.vector_norm((layer.forward_block(x) - y).double()))
                                 for x, y in zip(xs, ref_out))
                    layer.reset_expert(i)
                    assert la.eps[str(b)][i] == pytest.approx(direct, rel=5e-3, abs=1e-6), (i, b)
                    checked += not starved
    # Not vacuous: GPTQ experts were checked, and GPTQ beats round-to-nearest at 2 and 3 bits in sum.
    assert checked >= 6 * len(bits)
    for b in (2, 3):
        assert sum(la.eps[str(b)]) < sum(la_rtn.eps[str(b)])


def test_eps_quantizer_options_are_checked():
    with pytest.raises(ValueError, match="valid: rtn, gptq"):
        CalibrationConfig(quantizer="awq")
    with pytest.raises(ValueError, match="needs quantizer = 'gptq'"):
        CalibrationConfig(refit_1bit=True)
