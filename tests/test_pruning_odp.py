"""ODP: token importance (Eq. 6) against the attention probabilities, the ratio rule, protection, thresholds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mcmoe_vl.compat import cache_kwargs, output_cache
from mcmoe_vl.pruning.importance import (
    AttentionColumnCapture,
    ProtectScope,
    attention_column_stats,
    protection_mask,
    token_importance,
)
from mcmoe_vl.pruning.odp import (
    ODPConfig,
    ODPRule,
    ODPThresholds,
    fit_odp,
    non_top1_ratios,
    ratio_keep,
    threshold_from_ratios,
)
from model_adapters import expert_interface, get_adapter

from tiny_models import tiny_deepseek_v2, tiny_deepseek_v3, tiny_mixtral

MODELS = {"mixtral": tiny_mixtral, "deepseek_v2": tiny_deepseek_v2, "deepseek_v3": tiny_deepseek_v3}


def _padded_batch(vocab: int, seed: int = 0):
    """Three sequences of lengths 11, 7 and 4 in a (3, 11) batch: left, right and left padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    am = torch.ones(3, 11, dtype=torch.long)
    am[1, 7:] = 0  # right padding
    am[2, :7] = 0  # left padding
    return ids, am


def _eager(model):
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    return model


def _direct_importance(attn_probs, moe_in, am):
    """Eq. 6 computed directly per sequence on its valid tokens, in float64."""
    B, S = am.shape
    out = torch.full((B, S), float("-inf"), dtype=torch.float64)
    for b in range(B):
        pos = am[b].nonzero().flatten()
        L = pos.numel()
        A = attn_probs[b][:, pos][:, :, pos].double().mean(0)  # (L, L) heads averaged, valid rows / columns
        for r, j in enumerate(pos.tolist()):
            col = A[r:, r].sum()  # queries i >= j (causal)
            out[b, j] = moe_in[b, j].double().abs().sum() * col / (L - r)
    return out


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_token_importance_equals_direct_computation_with_padding(family, impl):
    model = _eager(MODELS[family]())
    ids, am = _padded_batch(model.config.vocab_size)
    moe_inputs: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        ref = model(ids, attention_mask=am, output_attentions=True)  # eager probabilities, the reference
        model.set_attn_implementation(impl)
        with expert_interface(model) as iface:
            iface.observe(lambda ev: moe_inputs.__setitem__(ev.layer.index, ev.hidden.reshape(*ev.batch_shape, -1)))
            capture = AttentionColumnCapture.for_layers(iface.layers, chunk_size=4)  # several query chunks
            got = {}
            with capture:
                def grab(layer, hidden, batch_shape, routing):
                    got[layer.index] = capture.pop(layer.index)
                    return None

                iface.set_routing_override(grab)
                out = model(ids, attention_mask=am)
    v = am.bool()  # (padded positions differ between eager and sdpa: fully masked rows)
    torch.testing.assert_close(out.logits[v], ref.logits[v], rtol=1e-5, atol=1e-5)  # capturing changes nothing
    assert set(got) == {la.index for la in iface.layers}
    for idx, stats in got.items():
        assert stats is not None and stats.prefill
        assert torch.equal(stats.valid, am.bool())
        direct = _direct_importance(ref.attentions[idx], moe_inputs[idx], am)
        imp = token_importance(moe_inputs[idx], stats).double()
        finite = am.bool()
        assert torch.isinf(imp[~finite]).all()
        assert direct[finite].abs().min() > 0  # not vacuous
        torch.testing.assert_close(imp[finite], direct[finite], rtol=1e-5, atol=1e-7)


def test_column_stats_are_batch_invariant_and_match_chunking():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    full = attention_column_stats(q, k, None, 0.35, chunk_size=1000)
    chunked = attention_column_stats(q, k, None, 0.35, chunk_size=2)
    torch.testing.assert_close(full.colsum, chunked.colsum)
    alone = attention_column_stats(q[1:], k[1:], None, 0.35)
    torch.testing.assert_close(full.colsum[1:], alone.colsum)
    assert torch.equal(full.count[0], torch.arange(9, 0, -1).float())  # L - j queries see key j


def test_protection_mask_per_sequence_and_batch():
    imp = torch.tensor([[5.0, 1.0, 3.0, float("-inf")], [0.5, 9.0, 0.1, 0.2]])
    valid = torch.isfinite(imp)
    seq = protection_mask(imp, valid, 0.25, ProtectScope.SEQUENCE)  # ceil(0.25*3)=1, ceil(0.25*4)=1
    assert seq.tolist() == [[True, False, False, False], [False, True, False, False]]
    bat = protection_mask(imp, valid, 0.3, ProtectScope.BATCH)  # ceil(0.3*7)=3 of the whole batch
    assert bat.tolist() == [[True, False, True, False], [False, True, False, False]]
    assert not protection_mask(imp, valid, 0.0).any()


def test_ratio_rule_generalises_top2_and_keeps_top1():
    w = torch.tensor([[0.2, 0.8, 0.0], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    keep = ratio_keep(w, 0.5)
    assert keep.tolist() == [[False, True, False], [True, True, False], [False, False, True]]
    assert ratio_keep(w, 0.0).all()
    assert ratio_keep(w, 1.01).sum(1).tolist() == [1, 1, 1]
    r = non_top1_ratios(w)
    assert r.numel() == 6 and (r <= 1).all()


def test_threshold_quantile_hits_the_prune_rate():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(1000, generator=g, dtype=torch.float64)
    mu = threshold_from_ratios(r, top_k=2, prune_rate=0.15)  # 30% of the second experts
    assert (r < mu).double().mean().item() == pytest.approx(0.30, abs=1e-3)
    med = threshold_from_ratios(r, top_k=6)
    assert (r < med).double().mean().item() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="impossible"):
        threshold_from_ratios(r, top_k=2, prune_rate=0.6)


def _ids(model, B=2, S=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, S), generator=g)


class _Rows(nn.Module):
    def __init__(self, inner, log):
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, x):
        self.log.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "deepseek_v3"])
def test_mu_zero_without_protection_reproduces_the_model_exactly(family):
    model = _eager(MODELS[family]())
    ids = _ids(model)
    with torch.no_grad():
        ref = model(ids).logits
        with expert_interface(model) as iface:
            th = ODPThresholds(mu={la.index: 0.0 for la in iface.layers}, protect_ratio=0.0)
            with ODPRule(iface, th):
                out = model(ids).logits
    assert ref.abs().mean() > 0.01
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "deepseek_v3"])
def test_mu_above_every_ratio_is_top1_routing_except_on_protected_tokens(family):
    model = _eager(MODELS[family]())
    ids, am = _padded_batch(model.config.vocab_size, seed=3)
    rows: list[int] = []
    decisions = {}
    with torch.no_grad(), expert_interface(model) as iface:
        k = iface.layers[0].top_k
        for la in iface.layers:
            for e in range(la.num_experts):
                la.set_expert(e, _Rows(la.expert(e), rows))
        th = ODPThresholds(mu={la.index: 1.5 for la in iface.layers}, protect_ratio=0.2)
        rule = ODPRule(iface, th)

        def spy(layer, hidden, batch_shape, routing):  # record what ODP decided, then apply it
            d = rule(layer, hidden, batch_shape, routing)
            decisions[layer.index] = (routing, d)
            return d

        with rule:
            iface.set_routing_override(spy)
            out = model(ids, attention_mask=am).logits
            iface.set_routing_override(None)
        odp_rows = sum(rows)
        rows.clear()
        # Reference: top-1 everywhere except the protected tokens, which keep all top-k.
        ref_rows: list[int] = []

        def top1_except(layer, hidden, batch_shape, routing):
            _, d = decisions[layer.index]
            protected = d.keep.all(dim=-1)  # (T,) tokens ODP kept whole
            keep = torch.zeros_like(routing.topk_idx, dtype=torch.bool)
            keep.scatter_(1, routing.top1_slot()[:, None], True)
            keep |= protected[:, None]
            from mcmoe_vl.moe import RoutingDecision

            dec = RoutingDecision.keep_only(routing, keep, layer.spec)
            dec.weights = torch.where(protected[:, None], routing.topk_weight, dec.weights)
            ref_rows.append(int(keep.sum()))
            return dec

        iface.set_routing_override(top1_except)
        ref = model(ids, attention_mask=am).logits
    n_valid = am.sum(1)
    per_layer = int(sum(math.ceil(0.2 * int(n)) for n in n_valid))  # protected per layer incl. none on padding
    for idx, (routing, d) in decisions.items():
        protected = d.keep.all(dim=-1)
        valid = am.reshape(-1).bool()
        assert int(protected[valid].sum()) >= per_layer  # the chosen tokens (plus padding-insensitive extras)
        assert int((d.keep.sum(-1) == 1).sum()) > 0
    assert rule.protected_tokens == per_layer * len(decisions)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert odp_rows == sum(rows) == sum(ref_rows) < ids.numel() * k * len(decisions)  # pruned pairs were never computed


def test_protection_changes_outputs_and_capture_is_layer_selective():
    model = _eager(tiny_mixtral(layers=3))
    ids = _ids(model, S=30)
    with torch.no_grad(), expert_interface(model) as iface:
        plain = ODPThresholds(mu={1: 0.9}, protect_ratio=0.0)
        with ODPRule(iface, plain) as r:
            assert r.capture is None
            a = model(ids).logits
        prot = ODPThresholds(mu={1: 0.9}, protect_ratio=0.1)
        with ODPRule(iface, prot) as r:
            atts = [la.attention for la in iface.layers]
            patched = [a_.config is not model.config for a_ in atts]
            b = model(ids).logits
        assert patched == [False, True, False]  # only the ODP layer pays for attention statistics
        assert all(a_.config is model.config for a_ in atts)  # removed again
    assert r.protected_tokens == 2 * math.ceil(0.1 * 30)
    assert not torch.allclose(a, b)


def test_decoding_applies_the_ratio_rule_only():
    model = _eager(tiny_mixtral())
    model.set_attn_implementation("sdpa")
    ids = _ids(model, B=1, S=8)
    with torch.no_grad(), expert_interface(model) as iface:
        th = ODPThresholds(mu={la.index: 1.5 for la in iface.layers}, protect_ratio=0.5)
        with ODPRule(iface, th) as rule:
            out = model(ids, use_cache=True)
            prefill_protected = rule.protected_tokens
            model(ids[:, -1:], **cache_kwargs(output_cache(out)), use_cache=True)
    assert prefill_protected == 4 * len(iface.layers)
    assert rule.protected_tokens == prefill_protected  # nothing protected in the decoding step


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_fit_odp_median_and_prune_rate(family):
    model = _eager(MODELS[family]())
    ids, am = _padded_batch(model.config.vocab_size)
    batches = [{"input_ids": ids, "attention_mask": am}, {"input_ids": _ids(model, S=9)}]
    th = fit_odp(model, batches, ODPConfig(protect_ratio=0.0), iface=expert_interface(model))
    assert set(th.mu) == {la.index for la in expert_interface(model).layers}
    k = expert_interface(model).layers[0].top_k
    n_tokens = int(am.sum()) + 2 * 9
    assert th.calibration_tokens == n_tokens  # padding excluded
    for frac in th.calibration_pruned_fraction.values():  # median of the non-top-1 ratios: half of them dropped
        assert frac == pytest.approx(0.5 * (k - 1) / k, abs=1.0 / n_tokens)
    th2 = fit_odp(model, batches, ODPConfig(prune_rate=0.2, protect_ratio=0.0, layers=[th.mu.__iter__().__next__()]),
                  iface=expert_interface(model))
    assert len(th2.mu) == 1
    assert next(iter(th2.calibration_pruned_fraction.values())) == pytest.approx(0.2, abs=1.0 / n_tokens)
    with pytest.raises(ValueError, match="no MoE block"):
        fit_odp(model, batches, ODPConfig(layers=[99]), iface=expert_interface(model))


def test_thresholds_from_pmq_calibration_stats_interpolate_stored_quantiles():
    from mcmoe_vl.calibration.stats import RatioQuantiles
    from mcmoe_vl.pruning.odp import thresholds_from_calibration_stats

    class _Layer:  # the two fields read from a LayerStats record
        def __init__(self, index, rq):
            self.index, self.odp_ratio = index, rq

    class _Stats:
        layers = [_Layer(1, RatioQuantiles(count=10, mean=0.4, quantiles={"0.25": 0.2, "0.50": 0.4, "0.75": 0.7})),
                  _Layer(2, None)]

    assert thresholds_from_calibration_stats(_Stats(), quantile=0.5, layers=[1]) == {1: 0.4}
    assert thresholds_from_calibration_stats(_Stats(), quantile=0.6, layers=[1])[1] == pytest.approx(0.52)
    with pytest.raises(ValueError, match="outside the stored range"):
        thresholds_from_calibration_stats(_Stats(), quantile=0.9, layers=[1])
    with pytest.raises(ValueError, match="no ODP ratio quantiles"):
        thresholds_from_calibration_stats(_Stats(), quantile=0.5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_odp_with_protection_runs_on_a_bfloat16_model(impl):
    model = _eager(tiny_mixtral()).to(torch.bfloat16)
    model.set_attn_implementation(impl)
    ids, am = _padded_batch(model.config.vocab_size)
    with torch.no_grad(), expert_interface(model) as iface:
        th = ODPThresholds(mu={la.index: 0.9 for la in iface.layers}, protect_ratio=0.2)
        with ODPRule(iface, th) as rule:
            out = model(ids, attention_mask=am).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out[am.bool()].float()).all()
    assert rule.protected_tokens == len(iface.layers) * sum(math.ceil(0.2 * int(n)) for n in am.sum(1))


def test_odp_protection_and_otp_run_on_deepseek_vl2():
    from mcmoe_vl.pruning.accounting import ActivationMeter
    from mcmoe_vl.pruning.otp import OTPConfig, OTPRule, train_otp

    from tiny_models import TINY_BUILDERS

    model = TINY_BUILDERS["deepseek_vl_v2"]()
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[0, :3] = 0
    with torch.no_grad(), expert_interface(model) as iface:
        th = ODPThresholds(mu={la.index: 0.9 for la in iface.layers}, protect_ratio=0.2)
        with ODPRule(iface, th) as rule, ActivationMeter(iface) as meter:
            model(input_ids=ids, attention_mask=am)
        assert rule.protected_tokens == len(iface.layers) * (math.ceil(0.2 * 9) + math.ceil(0.2 * 12))
        assert 0 < meter.report().reduction < 1
        preds, _ = train_otp(model, [{"input_ids": ids, "attention_mask": am}], OTPConfig(prune_rate=0.2, steps=5),
                             iface=iface, progress=False)
        with OTPRule(iface, preds), ActivationMeter(iface) as meter2:
            model(input_ids=ids, attention_mask=am)
    assert meter2.report().reduction > 0.05


def test_uninstall_removes_an_applied_odp_rule_and_its_attention_capture():
    from model_adapters import expert_interface
    from mcmoe_vl.pruning import ODPConfig, PruningMethod, apply_pruning, fit_pruning
    from tiny_models import tiny_mixtral

    model = tiny_mixtral()
    batch = {"input_ids": torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))}
    art = fit_pruning(model, [batch], PruningMethod.ODP, odp=ODPConfig(prune_rate=0.3, protect_ratio=0.1))
    with torch.no_grad():
        ref = model(**batch).logits
        iface = expert_interface(model).install()
        apply_pruning(iface, art)
        pruned = model(**batch).logits
        configs = [la.attention.config for la in iface.layers]
        iface.uninstall()
        after = model(**batch).logits
    assert not torch.allclose(pruned, ref)  # the rule was really active
    assert all(la.attention.config is model.config for la in iface.layers)  # capture configs restored
    assert any(c is not model.config for c in configs)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)


def test_fitting_refuses_an_interface_over_another_model():
    from mcmoe_vl.pruning.otp import OTPConfig, train_otp

    model, other = tiny_mixtral(), tiny_mixtral()
    batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (1, 8))}]
    for fit in (lambda i: fit_odp(model, batches, ODPConfig(), iface=i),
                lambda i: train_otp(model, batches, OTPConfig(steps=1), iface=i, progress=False)):
        with pytest.raises(ValueError, match="over another model"):
            fit(expert_interface(other))
        with pytest.raises(TypeError, match="iface must be the ExpertInterface"):
            fit(get_adapter(model))
