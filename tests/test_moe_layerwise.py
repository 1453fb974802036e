"""One captured-layer object (mcmoe_vl.moe.layerwise.CapturedLayer) feeds the calibration pass, ODP, OTP and the
quantization engine: on left-padded batches all four count exactly the real tokens, and the expert token counts of
calibration and GPTQ agree expert by expert.

Not vacuous: the batches carry padding that would route (a real token id), and counting it changes every number.

The layer step also replays what an adapter says the model's forward adds between decoder layers
(``layer_additions``), for any family.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_mixtral

from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.moe.layerwise import iterate_layers
from mcmoe_vl.pruning.odp import ODPConfig, fit_odp
from mcmoe_vl.pruning.otp import OTPConfig, train_otp
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.plan import BitPlan
from model_adapters import expert_interface, get_adapter

E, K, PAD = 4, 2, 6


def _batches(counted_padding: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for n_real in (20, 26):
        real = torch.randint(1, 96, (2, n_real), generator=g)
        ids = torch.cat([torch.full((2, PAD), 7), real], dim=1)  # left padding with a real token id
        mask = torch.cat([torch.zeros(2, PAD, dtype=torch.long), torch.ones(2, n_real, dtype=torch.long)], dim=1)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(mask) if counted_padding else mask})
    return out


REAL = 2 * 20 + 2 * 26  # real tokens over both batches


def _model():
    return tiny_mixtral(seed=2, experts=E, top_k=K, layers=2)


def test_captured_layer_holds_the_real_tokens_and_the_models_own_routing():
    model, batches = _model(), _batches()
    with expert_interface(model) as iface:
        for step in iterate_layers(model, batches, adapter=iface.adapter, progress=False):
            cap = step.capture(iface)
            assert cap.index == step.index and cap.num_tokens == REAL
            layer = iface.layer(step.index)
            for x, r, valid, inp in zip(cap.tokens, cap.routing, cap.valid, step.inputs, strict=True):
                assert valid is inp.valid and x.shape[0] == int(valid.sum())
                own = layer.route(x)  # routing the captured tokens again gives the captured routing
                assert torch.equal(own.topk_idx, r.topk_idx) and torch.equal(own.topk_weight, r.topk_weight)
            assert cap.image == [None, None]  # no image-token mask given


def test_calibration_odp_otp_and_gptq_agree_on_the_real_tokens():
    batches = _batches()
    stats = calibrate(_model(), batches, CalibrationConfig(eps_bits=(2,), group_size=16), progress=False)
    m_odp, m_otp = _model(), _model()
    odp = fit_odp(m_odp, batches, ODPConfig(prune_rate=0.2), iface=expert_interface(m_odp))
    _, otp = train_otp(m_otp, batches, OTPConfig(prune_rate=0.2, steps=2), iface=expert_interface(m_otp),
                       progress=False)
    model = _model()
    report = quantize_model(model, BitPlan.uniform({0: E, 1: E}, 2, group_size=16), batches,
                            QuantizeConfig(progress=False, min_tokens=0), adapter=get_adapter(model))
    gptq_counts = {la.index: [e.tokens for e in la.experts] for la in report.layers}
    for la in stats.layers:
        assert la.all.num_tokens == REAL
        assert otp[la.index]["tokens"] == REAL
        assert sum(la.all.counts) == sum(gptq_counts[la.index]) == K * REAL
    # expert by expert in the first layer (GPTQ feeds later layers the outputs of the quantized ones)
    assert stats.layers[0].all.counts == gptq_counts[stats.layers[0].index]
    assert odp.calibration_tokens == REAL

    # the setup has teeth: with the padding counted as real, every consumer sees more tokens
    counted = _batches(counted_padding=True)
    stats_c = calibrate(_model(), counted, CalibrationConfig(eps_bits=(2,), group_size=16), progress=False)
    assert all(la.all.num_tokens == REAL + 4 * PAD for la in stats_c.layers)
    m_odp = _model()
    assert fit_odp(m_odp, counted, ODPConfig(prune_rate=0.2), iface=expert_interface(m_odp)).calibration_tokens \
        == REAL + 4 * PAD


class _AddAfterLayer0:
    """The between-layer addition of a made-up family (a LayerAdditions): the model's forward adds a per-batch
    (B, S, H) tensor to decoder layer 0's outputs; ``record`` takes it in batch order when ``source`` runs."""

    def __init__(self, source: torch.nn.Module, delta: list[torch.Tensor]) -> None:
        self.source, self.pending = source, list(delta)

    def record(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.pending.pop(0)

    def after_layer(self, index: int, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return hidden + state if index == 0 else hidden


def _logits_with_addition(model, batches, delta: list[torch.Tensor]) -> list[torch.Tensor]:
    """The model's own forward with ``delta[b]`` added to decoder layer 0's outputs on batch ``b``."""
    out = []
    with torch.no_grad():
        for batch, d in zip(batches, delta, strict=True):
            handle = model.model.layers[0].register_forward_hook(lambda m, a, h, d=d: h + d)
            try:
                out.append(model(**batch).logits)
            finally:
                handle.remove()
    return out


def test_the_layer_step_replays_an_adapters_between_layer_additions(monkeypatch):
    model, batches = _model(), _batches()
    g = torch.Generator().manual_seed(9)
    delta = [torch.randn(*b["input_ids"].shape, model.config.hidden_size, generator=g) for b in batches]
    refs = _logits_with_addition(model, batches, delta)
    with torch.no_grad():
        assert (model(**batches[0]).logits - refs[0]).abs().max() > 1e-2  # the addition changes the output
    with expert_interface(model) as iface:
        adapter = type(iface.adapter)
        monkeypatch.setattr(adapter, "layer_additions", lambda self, m: _AddAfterLayer0(m.model, delta))
        for step in iterate_layers(model, batches, adapter=iface.adapter, progress=False):
            outs = step.run()
        with torch.no_grad():
            logits = [model.lm_head(model.model.norm(h)) for h in outs]
        for a, b in zip(logits, refs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # a source the forward does not run before decoder layer 0 is an error, not a silent skip
        monkeypatch.setattr(adapter, "layer_additions", lambda self, m: _AddAfterLayer0(m.lm_head, delta))
        with pytest.raises(RuntimeError, match="did not run exactly once before decoder layer 0"):
            next(iterate_layers(model, batches, adapter=iface.adapter, progress=False))
