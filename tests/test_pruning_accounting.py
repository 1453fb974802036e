"""Accounting (active experts, activated parameters, rows really computed) and the ODP artifact path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcmoe_vl.pruning.accounting import ActivationMeter
from mcmoe_vl.pruning.artifact import PruningMethod, apply_pruning, load_pruning, odp_artifact, save_pruning
from mcmoe_vl.pruning.odp import ODPConfig, fit_odp
from model_adapters import expert_interface

from tiny_models import tiny_deepseek_v2, tiny_mixtral


class _Rows(nn.Module):
    def __init__(self, inner, log, key):
        super().__init__()
        self.inner, self.log, self.key = inner, log, key

    def forward(self, x):
        self.log[self.key] = self.log.get(self.key, 0) + x.shape[0]
        return self.inner(x)


def _ids(model, B=2, S=20, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, S), generator=g)


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_deepseek_v2])
def test_meter_counts_the_rows_experts_compute_and_activated_params(build, tmp_path):
    model = build()
    model.set_experts_implementation("eager")
    ids = _ids(model)
    am = torch.ones_like(ids)
    am[1, :6] = 0
    th = fit_odp(model, [{"input_ids": _ids(model, seed=3)}], ODPConfig(protect_ratio=0.1),
                 iface=expert_interface(model))
    rows: dict[int, int] = {}
    with torch.no_grad(), expert_interface(model) as iface:
        path = save_pruning(odp_artifact(iface, th), tmp_path / "odp.json")
        art = load_pruning(path)
        assert art.method is PruningMethod.ODP and art.odp.mu == th.mu
        for la in iface.layers:
            for e in range(la.num_experts):
                la.set_expert(e, _Rows(la.expert(e), rows, la.index))
        with ActivationMeter(iface, time_layers=True) as full_meter:
            model(ids)
        rows_full = dict(rows)
        rows.clear()
        with apply_pruning(iface, art), ActivationMeter(iface, time_layers=True) as meter:
            model(ids, attention_mask=am)
            meter.token_mask = am
            model(ids, attention_mask=am)
    full, rep = full_meter.report(), meter.report()
    k = iface.layers[0].top_k
    T = ids.numel()
    assert all(x.avg_active_experts == k and x.reduction == 0 for x in full.layers)
    assert {x.index: x.active_pairs for x in full.layers} == rows_full == {la.index: T * k for la in iface.layers}
    # Pruned pairs were never computed: per layer, rows computed == pairs the meter counted (first run all tokens).
    for x in rep.layers:
        assert 1.0 <= x.avg_active_experts < k
        assert x.tokens == T + int(am.sum())
    assert all(rows[x.index] > x.active_pairs for x in rep.layers)  # the masked run counted real tokens only
    assert 0 < rep.reduction < 0.5
    # Activated parameters: everything but routed experts + one expert's params per active expert.
    routed = sum(la.num_experts * sum(w.numel() for w in vars(la.expert_weights(0)).values()) for la in iface.layers)
    total = sum(p.numel() for p in model.parameters())
    assert rep.always_active_params == total - routed
    per_expert = {la.index: sum(w.numel() for w in vars(la.expert_weights(0)).values()) for la in iface.layers}
    expect = rep.always_active_params + sum(x.avg_active_experts * per_expert[x.index] for x in rep.layers)
    assert rep.activated_params_per_token == pytest.approx(expect)
    assert full.activated_params_reduction == 0 and 0 < rep.activated_params_reduction < rep.reduction
    assert rep.moe_seconds is not None and rep.moe_seconds > 0
