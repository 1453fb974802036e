"""DeepSeek-VL2 language-model variants against an independent float64 reading of the official code.

The reference below is written from the official DeepSeek-VL2 ``modeling_deepseek.py`` (transformers 4.38 era) and
reads the weights under their OFFICIAL names (``official_state_dict``), so it checks the key mapping too:

- attention: ``use_mla=false`` -> Llama-style MHA (rotate_half on the whole head); ``use_mla=true`` -> latent
  attention (q via q_proj or q_a_proj/q_a_layernorm/q_b_proj; kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj;
  rotary on the rope part after the (d/2, 2) -> (2, d/2) permutation; scale (nope + rope)^-0.5);
- MoE gate: softmax greedy top-k, or sigmoid ``noaux_tc`` (choice by score + correction bias, weights from the
  scores), ``norm_topk_prob`` with the 1e-20 guard, times ``routed_scaling_factor``; plus shared experts;
- dense MLP for the first ``first_k_dense_replace`` layers; RMSNorm; untied lm_head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_adapters.deepseek_vl2 import model_from_config
from model_adapters.deepseek_vl2.loading import official_state_dict
from model_adapters.deepseek_vl2.tiny import tiny_official_config



MLA = dict(use_mla=True, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20)
VARIANTS = {
    "tiny_mha_greedy": dict(routed_scaling_factor=1.0),
    "tiny_mha_gqa_scaled": dict(num_key_value_heads=2, routed_scaling_factor=1.5),
    "small_mla_greedy": MLA,
    "full_mla_qlora_noaux_tc": dict(MLA, q_lora_rank=48, topk_method="noaux_tc", scoring_func="sigmoid",
                                    norm_topk_prob=True, routed_scaling_factor=2.0, n_group=1, topk_group=1),
    "noaux_tc_no_renorm": dict(MLA, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=False,
                               routed_scaling_factor=2.0),
}


# -- the reference ---------------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-b, a), dim=-1)


def _cos_sin(dim, theta, s):
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    f = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


def _attend(q, k, v, scale):
    s = q.shape[-2]
    causal = torch.full((s, s), float("-inf"), dtype=q.dtype).triu(1)
    w = torch.softmax(q @ k.transpose(-1, -2) * scale + causal, dim=-1)
    return w @ v  # (B, h, S, dv)


def _mha(x, W, p, lc):
    b, s, _ = x.shape
    nh = lc["num_attention_heads"]
    nkv = lc.get("num_key_value_heads") or nh
    hd = lc["hidden_size"] // nh
    q = (x @ W[p + "q_proj.weight"].T).view(b, s, nh, hd).transpose(1, 2)
    k = (x @ W[p + "k_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2)
    v = (x @ W[p + "v_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2)
    cos, sin = _cos_sin(hd, lc["rope_theta"], s)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    o = _attend(q, k, v, hd**-0.5).transpose(1, 2).reshape(b, s, -1)
    return o @ W[p + "o_proj.weight"].T


def _mla(x, W, p, lc):
    b, s, _ = x.shape
    nh, nope, rope, dv, r = (lc[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                             "v_head_dim", "kv_lora_rank"))
    eps = lc["rms_norm_eps"]
    if lc.get("q_lora_rank") is None:
        q = x @ W[p + "q_proj.weight"].T
    else:
        q = _rms(x @ W[p + "q_a_proj.weight"].T, W[p + "q_a_layernorm.weight"], eps) @ W[p + "q_b_proj.weight"].T
    q = q.view(b, s, nh, nope + rope).transpose(1, 2)
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    ckv = x @ W[p + "kv_a_proj_with_mqa.weight"].T
    ckv, k_pe = ckv.split([r, rope], dim=-1)
    k_pe = k_pe.view(b, s, 1, rope).transpose(1, 2)
    kv = (_rms(ckv, W[p + "kv_a_layernorm.weight"], eps) @ W[p + "kv_b_proj.weight"].T)
    kv = kv.view(b, s, nh, nope + dv).transpose(1, 2)
    k_nope, v = kv.split([nope, dv], dim=-1)

    def perm(t):  # official: view(b, h, s, d/2, 2).transpose(4, 3).reshape(b, h, s, d)
        bb, hh, ss, d = t.shape
        return t.view(bb, hh, ss, d // 2, 2).transpose(4, 3).reshape(bb, hh, ss, d)

    cos, sin = _cos_sin(rope, lc["rope_theta"], s)
    q_pe, k_pe = perm(q_pe), perm(k_pe)
    q_pe, k_pe = q_pe * cos + _rotate_half(q_pe) * sin, k_pe * cos + _rotate_half(k_pe) * sin
    qs = torch.cat([q_nope, q_pe], dim=-1)
    ks = torch.cat([k_nope, k_pe.expand(-1, nh, -1, -1)], dim=-1)
    o = _attend(qs, ks, v, (nope + rope) ** -0.5).transpose(1, 2).reshape(b, s, -1)
    return o @ W[p + "o_proj.weight"].T


def _mlp(x, W, p):
    return (F.silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def _gate(x, W, p, lc):
    """Official MoEGate: (topk_idx (T, k), topk_weight (T, k))."""
    logits = x @ W[p + "gate.weight"].T
    k = lc["num_experts_per_tok"]
    if lc.get("scoring_func", "softmax") == "softmax":
        scores = logits.softmax(-1)
    else:
        scores = logits.sigmoid()
    if lc.get("topk_method", "greedy") == "greedy":
        w, idx = torch.topk(scores, k=k, dim=-1, sorted=False)
    else:  # noaux_tc with one group: choose by score + bias, weigh by score
        choice = scores + W[p + "gate.e_score_correction_bias"][None]
        idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
    if k > 1 and lc.get("norm_topk_prob", False):
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * lc["routed_scaling_factor"]
    else:
        w = w * lc["routed_scaling_factor"]
    return idx, w


def _moe(x, W, p, lc):
    b, s, h = x.shape
    t = x.reshape(-1, h)
    idx, w = _gate(t, W, p, lc)
    y = torch.zeros_like(t)
    for tok in range(t.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[tok, j])
            y[tok] += w[tok, j] * _mlp(t[tok : tok + 1], W, f"{p}experts.{e}.")[0]
    return y.view(b, s, h) + _mlp(x, W, p + "shared_experts."), idx


def reference_logits(W: dict[str, torch.Tensor], lc: dict, embeds: torch.Tensor):
    """float64 logits (B, S, V) and the routing of every MoE layer from official-named weights."""
    W = {k: v.double() for k, v in W.items()}
    x = embeds.double()
    eps = lc["rms_norm_eps"]
    routes = []
    for i in range(lc["num_hidden_layers"]):
        p = f"language.model.layers.{i}."
        hn = _rms(x, W[p + "input_layernorm.weight"], eps)
        attn = _mla if lc.get("use_mla", True) else _mha
        x = x + attn(hn, W, p + "self_attn.", lc)
        hn = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if i >= lc["first_k_dense_replace"]:
            y, idx = _moe(hn, W, p + "mlp.", lc)
            routes.append(idx)
        else:
            y = _mlp(hn, W, p + "mlp.")
        x = x + y
    x = _rms(x, W["language.model.norm.weight"], eps)
    return x @ W["language.lm_head.weight"].T, routes


# -- the test ---------------------------------------------------------------------------------------------------------


def _model(lang, seed=0):
    model = model_from_config(tiny_official_config(**lang), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights with spread so routing and attention are far from uniform
        for name, p in model.language.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.language.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_language_model_matches_float64_reading_of_official_code(variant):
    cfg = tiny_official_config(**VARIANTS[variant])
    lc = dict(cfg["language_config"])
    lc.setdefault("num_key_value_heads", lc["num_attention_heads"])
    model = _model(VARIANTS[variant])
    assert model.config.official.language.use_mla == lc["use_mla"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 384, (2, 11), generator=g)
    gates = [la.mlp.gate for la in model.language.model.layers if hasattr(la.mlp, "gate")]
    chosen = []
    hooks = [gt.register_forward_hook(lambda m, a, o: chosen.append(o[2])) for gt in gates]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        out = model(inputs_embeds=embeds)
    for h in hooks:
        h.remove()
    ref, routes = reference_logits(official_state_dict(model), lc, embeds)
    assert ref.abs().mean() > 1e-2  # not vacuous
    torch.testing.assert_close(out.logits.double(), ref, rtol=0, atol=2e-5)
    # The same experts as the official rule, and the routing is not degenerate.
    assert len(chosen) == len(routes) == lc["num_hidden_layers"] - lc["first_k_dense_replace"]
    for port_idx, idx in zip(chosen, routes, strict=True):
        assert torch.equal(port_idx.sort(-1).values, idx.sort(-1).values)
        assert idx.unique().numel() >= 4


def test_correction_bias_changes_the_selection():
    """The noaux_tc correction bias really takes part in choosing (the variant tests are not vacuous for it)."""
    lang = VARIANTS["full_mla_qlora_noaux_tc"]
    model = _model(lang)
    gate = model.language.model.layers[1].mlp.gate
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, w, idx = gate(x)
        bias = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()
        _, _, idx0 = gate(x)
        gate.e_score_correction_bias.copy_(bias)
    assert not torch.equal(idx.sort(-1).values, idx0.sort(-1).values)
    torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.0))  # renormalised, times 2.0
