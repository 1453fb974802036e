"""Calibration statistics on tiny random models: exact counts, weights recomputed from the router's logits,
image / text split, Hessian traces, ODP ratio quantiles, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_deepseek_v2, tiny_mixtral

from mcmoe_vl.calibration import calibrate as cal_mod
from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate, load_stats
from mcmoe_vl.calibration.stats import save_stats


def make_batches(seed: int = 0, n: int = 3, B: int = 2, S: int = 16, pad: bool = True, image: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        batch = {"input_ids": torch.randint(0, 96, (B, S), generator=g),
                 "attention_mask": torch.ones(B, S, dtype=torch.long)}
        if pad and b == 0:
            batch["attention_mask"][0, :5] = 0  # left padding of one sequence
        if image:
            m = torch.zeros(B, S, dtype=torch.bool)
            m[:, 3 : 3 + 4 + b] = True
            batch["image_token_mask"] = m
        out.append(batch)
    return out


def block_inputs(model, batches, layer_idx):
    """(T, H) inputs of the MoE block of decoder layer ``layer_idx``, padding removed, via a plain forward hook."""
    block = model.model.layers[layer_idx].mlp
    seen = []
    h = block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for b in batches:
                model(**{k: v for k, v in b.items() if k != "image_token_mask"}, use_cache=False)
    finally:
        h.remove()
    return [x.reshape(-1, x.shape[-1])[b["attention_mask"].reshape(-1).bool()] for x, b in zip(seen, batches)]


def reference_routing(model, x, layer_idx):
    """Routing recomputed from the router's weight in float64: (pre-renorm probs (T, E), topk idx (T, k))."""
    block = model.model.layers[layer_idx].mlp
    with torch.no_grad():
        logits = F.linear(x.double(), block.gate.weight.double())
    probs = torch.softmax(logits, dim=-1)
    k = model.config.num_experts_per_tok
    return probs, probs.topk(k, dim=-1).indices


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory):
    model = tiny_mixtral(seed=1)
    batches = make_batches(image=True)
    out = tmp_path_factory.mktemp("cal") / "stats.json"
    stats = calibrate(model, batches, CalibrationConfig(eps_bits=(1, 2, 3)), output=out, progress=False)
    return model, batches, stats, out


def test_counts_sum_to_k_times_tokens_and_match_router(mixtral_run):
    model, batches, stats, _ = mixtral_run
    N = sum(int(b["attention_mask"].sum()) for b in batches)
    assert N == 3 * 2 * 16 - 5  # the padding is excluded
    assert [la.index for la in stats.layers] == [0, 1] and stats.complete
    for la in stats.layers:
        assert la.all.num_tokens == N
        assert sum(la.all.counts) == la.top_k * N
        xs = block_inputs(model, batches, la.index)
        counts = np.zeros(la.num_experts, dtype=np.int64)
        wsum = np.zeros(la.num_experts)
        wren = np.zeros(la.num_experts)
        for x in xs:
            probs, idx = reference_routing(model, x, la.index)
            p = probs.gather(1, idx)
            np.add.at(counts, idx.reshape(-1).numpy(), 1)
            np.add.at(wsum, idx.reshape(-1).numpy(), p.reshape(-1).numpy())
            np.add.at(wren, idx.reshape(-1).numpy(), (p / p.sum(-1, keepdim=True)).reshape(-1).numpy())
        assert la.all.counts == counts.tolist()
        assert (counts > 0).sum() >= la.num_experts - 1  # not vacuous: routing spreads over the experts
        np.testing.assert_allclose(la.all.weight_sum, wsum, rtol=1e-5)
        np.testing.assert_allclose(la.all.weight_sum_renorm, wren, rtol=1e-5)
        # Mixtral applies the renormalised weights.
        np.testing.assert_allclose(la.all.weight_sum_applied, wren, rtol=1e-5)
        assert sum(la.all.weight_sum_renorm) == pytest.approx(N)
        np.testing.assert_allclose(la.all.w, wsum / N, rtol=1e-5)
        np.testing.assert_allclose(la.all.phi, counts / N)


def test_image_text_split_partitions_the_tokens(mixtral_run):
    _, batches, stats, _ = mixtral_run
    n_img = sum(int((b["image_token_mask"] & b["attention_mask"].bool()).sum()) for b in batches)
    for la in stats.layers:
        assert la.image is not None and la.text is not None
        assert la.image.num_tokens == n_img > 0
        assert la.image.num_tokens + la.text.num_tokens == la.all.num_tokens
        assert [a + b for a, b in zip(la.image.counts, la.text.counts)] == la.all.counts
        np.testing.assert_allclose(np.add(la.image.weight_sum, la.text.weight_sum), la.all.weight_sum, rtol=1e-9)


def test_hessian_traces_and_odp_ratio_quantiles(mixtral_run):
    model, batches, stats, _ = mixtral_run
    la = stats.layers[1]
    xs = block_inputs(model, batches, 1)
    tr = np.zeros(la.num_experts)
    ratios = []
    for x in xs:
        probs, idx = reference_routing(model, x, 1)
        for e in range(la.num_experts):
            tr[e] += 2 * x[(idx == e).any(-1)].double().pow(2).sum().item()
        p = probs.gather(1, idx)
        ratios.append((p.min(-1).values / p.max(-1).values).numpy())  # top-2: w1 / w0
    np.testing.assert_allclose(la.hessian_trace_in, tr, rtol=1e-5)
    r = np.concatenate(ratios)
    assert la.odp_ratio is not None and la.odp_ratio.count == r.size
    assert la.odp_ratio.median == pytest.approx(float(np.median(r)), rel=1e-5)
    assert la.odp_ratio.quantile(0.9) == pytest.approx(float(np.quantile(r, 0.9)), rel=1e-5)
    assert all(v > 0 for v in la.hessian_trace_mid)


def test_deepseek_scaled_weights_and_shared_experts():
    model = tiny_deepseek_v2(seed=2)
    batches = make_batches(seed=3, pad=False)
    stats = calibrate(model, batches, CalibrationConfig(eps_bits=(2,)), progress=False)
    assert [la.index for la in stats.layers] == [1, 2]  # layer 0 is dense
    la = stats.layers[0]
    N = 3 * 2 * 16
    assert sum(la.all.counts) == 3 * N
    # DeepSeek-V2 applies the pre-renormalisation probability times routed_scaling_factor (no renormalisation).
    np.testing.assert_allclose(la.all.weight_sum_applied, np.asarray(la.all.weight_sum) * 1.5, rtol=1e-5)
    assert la.image is None and la.odp_ratio is not None


def test_resume_skips_finished_layers_and_matches_a_fresh_run(mixtral_run, tmp_path, monkeypatch):
    model, batches, full, _ = mixtral_run
    partial = full.model_copy(deep=True)
    partial.layers = partial.layers[:1]
    path = tmp_path / "stats.json"
    save_stats(partial, path)
    computed = []
    real = cal_mod.layer_statistics
    monkeypatch.setattr(cal_mod, "layer_statistics",
                        lambda layer, *a, **k: computed.append(layer.index) or real(layer, *a, **k))
    resumed = calibrate(model, batches, CalibrationConfig(eps_bits=(1, 2, 3)), output=path, progress=False)
    assert computed == [1]  # only the unfinished layer ran
    assert resumed.model_dump() == full.model_dump()
    assert load_stats(path).model_dump() == full.model_dump()
    # Complete: nothing more to do.
    calibrate(model, batches, CalibrationConfig(eps_bits=(1, 2, 3)), output=path, progress=False)
    assert computed == [1]


def test_resume_refuses_other_data_or_config(mixtral_run):
    model, batches, _, path = mixtral_run
    with pytest.raises(ValueError, match="data_fingerprint"):
        calibrate(model, make_batches(seed=9), CalibrationConfig(eps_bits=(1, 2, 3)), output=path, progress=False)
    with pytest.raises(ValueError, match="config"):
        calibrate(model, batches, CalibrationConfig(eps_bits=(2,)), output=path, progress=False)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(tiny_mixtral(), [], progress=False)
    with pytest.raises(ValueError, match="eps widths"):
        CalibrationConfig(eps_bits=(0, 2))
    with pytest.raises(ValueError, match="extra"):
        CalibrationConfig(eps_bit=(2,))


def test_vision_language_model_splits_image_and_text_tokens():
    """DeepSeek-VL2 (tiny, official layout) with an image: its images_seq_mask splits the statistics."""
    from pathlib import Path

    from safetensors.torch import load_file
    from tiny_models import tiny_deepseek_vl2

    d = load_file(str(Path(__file__).parent / "data/deepseek_vl2_reference/inputs.safetensors"))
    batch = {"input_ids": d["ids"], "attention_mask": torch.ones_like(d["ids"]), "images": d["images"],
             "images_seq_mask": d["seq_mask"].bool(), "images_spatial_crop": d["spatial"]}
    stats = calibrate(tiny_deepseek_vl2(), [batch, batch], CalibrationConfig(eps_bits=(2,), group_size=16),
                      progress=False)
    n_img = 2 * int(d["seq_mask"].sum())
    assert stats.model_type == "deepseek_vl_v2" and [la.index for la in stats.layers] == [1, 2]
    for la in stats.layers:
        assert la.image.num_tokens == n_img > 0 and la.text.num_tokens == 2 * 28 - n_img > 0
        assert sum(la.image.counts) == la.top_k * n_img
        assert [a + b for a, b in zip(la.image.counts, la.text.counts)] == la.all.counts
        assert la.image.counts != la.text.counts  # the two token kinds route differently here
