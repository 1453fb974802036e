"""The common expert interface: one contract, parametrized over every registered adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mcmoe_vl.moe import ExpertInterface, RoutingDecision, Scoring
from mcmoe_vl.moe.layerwise import iterate_layers
from model_adapters import ADAPTERS, get_adapter

from tiny_models import TINY_BUILDERS

ADAPTER_NAMES = ADAPTERS.names()


def test_every_registered_adapter_has_a_contract_instance():
    missing = [n for n in ADAPTER_NAMES if n not in TINY_BUILDERS]
    assert not missing, f"adapters without a tiny model for the contract tests: {missing}"


@pytest.fixture(params=ADAPTER_NAMES)
def model(request):
    return TINY_BUILDERS[request.param]()


def _ids(model, batch=2, seq=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.get_text_config().vocab_size, (batch, seq), generator=g)


def _with_eager_experts(model):
    # transformers' default experts kernel (grouped_mm) differs from the eager loop in the last bits; the eager
    # loop is the bit-exact reference for the interface's dispatch.
    model.set_experts_implementation("eager")
    return model


def test_outputs_unchanged_with_interface_installed(model):
    ids = _ids(model)
    with torch.no_grad():
        ref_default = model(ids).logits
        _with_eager_experts(model)
        ref = model(ids).logits
        with ExpertInterface(model, get_adapter(model)) as iface:
            assert iface.installed and len(iface) >= 1
            out = model(ids).logits
        after = model(ids).logits
    assert ref.abs().mean() > 0.01  # not vacuous
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_default, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)


def test_uninstall_restores_the_model(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = [la.block for la in get_adapter(model).moe_layers(model)]
    with ExpertInterface(model, get_adapter(model)) as iface:
        iface.observe(lambda ev: None)
        iface.set_routing_override(lambda *a: None)
        iface.layers[0].set_expert(0, nn.Identity())
    assert all("forward" not in vars(b) for b in blocks)
    assert all(not la.observers and la.routing_override is None and not la.replaced_experts for la in iface.layers)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_routing_equals_the_models_own(model):
    ids = _ids(model)
    seen = {}

    def grab(ev):
        seen[ev.layer.index] = ev.routing

    with torch.no_grad(), ExpertInterface(model, get_adapter(model)) as iface:
        iface.observe(grab)
        out = model(ids, output_router_logits=True)
    logits_by_layer = out.router_logits
    assert len(logits_by_layer) == len(iface.layers) == len(seen)
    for layer, logits in zip(iface.layers, logits_by_layer, strict=True):
        r = seen[layer.index]
        spec = layer.spec
        T = ids.numel()
        assert r.probs.shape == (T, spec.num_experts) and r.topk_idx.shape == (T, spec.top_k)
        # Probabilities from the model's recorded router logits.
        expect = logits.double().softmax(-1) if spec.scoring is Scoring.SOFTMAX else logits.double().sigmoid()
        torch.testing.assert_close(r.probs.double(), expect, rtol=1e-6, atol=1e-7)
        # Top-k and weights from an independent float64 recomputation of the routing rule.
        choice = expect.clone()
        if spec.has_correction_bias:
            choice = choice + layer.block.gate.e_score_correction_bias.double()
        idx = choice.topk(spec.top_k, dim=-1).indices
        assert torch.equal(idx.sort(-1).values, r.topk_idx.sort(-1).values)
        w = expect.gather(1, r.topk_idx)
        if spec.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w * spec.routed_scaling_factor
        torch.testing.assert_close(r.topk_weight.double(), w, rtol=1e-5, atol=1e-6)
        # Routing is not degenerate: several experts are used.
        assert r.topk_idx.unique().numel() >= 3


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module, log: list[int], e: int) -> None:
        super().__init__()
        self.inner, self.log, self.e = inner, log, e

    def forward(self, x):
        self.log.append(x.shape[0])
        return self.inner(x)


def test_top1_keep_mask_equals_top1_model_and_skips_pruned_pairs(model):
    """Keeping only each token's strongest expert equals the same model built with top-1 routing."""
    _with_eager_experts(model)
    config = model.config.get_text_config()
    top1 = copy.deepcopy(model)
    top1.config.get_text_config().num_experts_per_tok = 1
    for layer in get_adapter(top1).moe_layers(top1):
        layer.block.gate.top_k = 1
    ids = _ids(model)
    rows: list[int] = []
    kept_pairs = []

    def top1_only(layer, hidden, batch_shape, routing):
        keep = torch.zeros_like(routing.topk_idx, dtype=torch.bool)
        slot = routing.top1_slot()
        if layer.spec.has_correction_bias:  # a top-1 noaux_tc router picks by score + bias
            choice = routing.probs + layer.block.gate.e_score_correction_bias
            slot = choice.gather(1, routing.topk_idx).argmax(-1)
        keep.scatter_(1, slot[:, None], True)
        kept_pairs.append(int(keep.sum()))
        return RoutingDecision.keep_only(routing, keep, layer.spec)

    with torch.no_grad():
        ref = top1(ids).logits
        full = model(ids).logits
        with ExpertInterface(model, get_adapter(model)) as iface:
            for layer in iface:
                for e in range(layer.num_experts):
                    layer.set_expert(e, _Counting(layer.expert(e), rows, e))
            iface.set_routing_override(top1_only)
            out = model(ids).logits
    assert config.num_experts_per_tok > 1
    assert not torch.allclose(full, ref, atol=1e-3)  # top-1 really differs from top-k here
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # Pruned pairs were never computed: the experts saw exactly one row per token per layer.
    assert sum(rows) == sum(kept_pairs) == ids.numel() * len(iface.layers)


def test_expert_weights_are_views_and_replacement_is_used(model):
    _with_eager_experts(model)
    ids = _ids(model)
    with torch.no_grad(), ExpertInterface(model, get_adapter(model)) as iface:
        layer = iface.layers[-1]
        w = layer.expert_weights(1)
        I, H = w.gate.shape
        assert w.up.shape == (I, H) and w.down.shape == (H, I)
        ref = model(ids).logits

        class FromWeights(nn.Module):  # an independent expert built from the 2-D views
            def __init__(self, ew, act):
                super().__init__()
                self.ew, self.act = ew, act

            def forward(self, x):
                return (self.act(x @ self.ew.gate.T) * (x @ self.ew.up.T)) @ self.ew.down.T

        for e in range(layer.num_experts):
            layer.set_expert(e, FromWeights(layer.expert_weights(e), layer.storage.act_fn))
        same = model(ids).logits
        layer.set_expert(1, _Zero())
        changed = model(ids).logits
        layer.reset_expert()
        back = model(ids).logits
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, ref, atol=1e-4)
    torch.testing.assert_close(back, ref, rtol=0, atol=0)


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_forward_block_runs_the_moe_block_alone(model):
    _with_eager_experts(model)
    x = torch.randn(2, 5, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer = get_adapter(model).moe_layers(model)[0]
        ref = layer.block(x)
        with ExpertInterface(model, get_adapter(model)) as iface:
            out = iface.layers[0].forward_block(x)
    assert ref.abs().mean() > 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_layerwise_iteration_reproduces_the_logits(model):
    adapter = get_adapter(model)
    batches = [{"input_ids": _ids(model, seed=s)} for s in range(2)]
    with torch.no_grad():
        ref = [model(**b).logits for b in batches]
        outs = None
        for step in iterate_layers(model, batches, adapter=adapter, progress=False):
            outs = step.run()
        lm = adapter.language_model(model)
        logits = [model.lm_head(lm.norm(h)) for h in outs]
    for a, b in zip(logits, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_adapter_is_given_by_the_caller():
    from model_adapters import expert_interface

    model = TINY_BUILDERS["mixtral"]()
    with pytest.raises(TypeError, match="needs the model's adapter"):
        ExpertInterface(model, None)
    with pytest.raises(TypeError, match="decoder layers or the model's adapter"):
        next(iterate_layers(model, [{"input_ids": _ids(model)}], progress=False))
    iface = expert_interface(model)
    assert type(iface.adapter) is type(get_adapter(model)) and not iface.installed
    assert [la.path for la in iface.layers] == [la.path for la in ExpertInterface(model, get_adapter(model)).layers]
    with expert_interface(model, install=True) as installed:
        assert installed.installed and all("forward" in vars(la.block) for la in installed.layers)
