"""GPTQ Hessians leave padding out: a left-padded batch quantizes exactly like the same tokens unpadded.

The check is not vacuous: the same padded batch with its padding counted (an all-ones attention mask) changes the
quantized weights and the per-expert token counts.
"""

from __future__ import annotations

import torch
from tiny import tiny_mixtral_q

from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.plan import BitPlan
from model_adapters import get_adapter

PAD = 8
LAYER = 0  # layer 0: its inputs are the embeddings, equal for the real tokens whatever the padding


def _quantize(batch):
    model = tiny_mixtral_q(seed=3, experts=4, layers=2)
    plan = BitPlan.uniform({0: 4, 1: 4}, 2, group_size=128)
    report = quantize_model(model, plan, [batch], QuantizeConfig(progress=False, min_tokens=0),
                            adapter=get_adapter(model))
    layer = model.model.layers[LAYER]
    weights = {
        "q_proj": layer.self_attn.q_proj.weight(torch.float32),
        **{f"expert{e}.down": layer.mlp.experts.experts[e].down.weight(torch.float32) for e in range(4)},
    }
    tokens = [[e.tokens for e in la.experts] for la in report.layers]
    return weights, tokens


def test_padding_tokens_do_not_enter_the_hessians():
    g = torch.Generator().manual_seed(11)
    real = torch.randint(1, 96, (1, 40), generator=g)
    pad = torch.full((1, PAD), 95)  # a real token id, so padding would route and count if it were not excluded
    padded_ids = torch.cat([pad, real], dim=1)
    mask = torch.cat([torch.zeros(1, PAD, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], dim=1)

    w_ref, t_ref = _quantize({"input_ids": real, "attention_mask": torch.ones_like(real)})
    w_pad, t_pad = _quantize({"input_ids": padded_ids, "attention_mask": mask})
    w_counted, t_counted = _quantize({"input_ids": padded_ids, "attention_mask": torch.ones_like(padded_ids)})

    assert t_pad[LAYER] == t_ref[LAYER]  # top-2 over the 40 real tokens
    assert all(sum(t) == 2 * 40 for t in t_pad)
    assert all(sum(t) == 2 * (40 + PAD) for t in t_counted)  # the setup would count padding if it were kept
    # attention sees the embeddings: bit-identical; experts see attention outputs whose positions moved by PAD
    # (RoPE is relative, so equal up to rounding): at most a few codes flip at a GPTQ rounding boundary
    assert torch.equal(w_pad["q_proj"], w_ref["q_proj"])
    for name, ref in w_ref.items():
        assert (w_pad[name] != ref).float().mean() < 0.02, name
        # counting the padding moves a large share of the codes: the comparison above has teeth
        assert (w_counted[name] != ref).float().mean() > 0.04, name
