"""DeepSeek-VL2 through the common expert interface: the lead's contract on the tiny VLM, plus image batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import test_interface as contract
from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.moe import Scoring
from mcmoe_vl.moe.layerwise import iterate_layers
from model_adapters import expert_interface, get_adapter
from model_adapters.deepseek_vl2 import model_from_config
from model_adapters.deepseek_vl2.adapter import DeepseekVL2Adapter, image_text_batches, load_image_text_samples
from model_adapters.deepseek_vl2.processing import DeepseekVL2Processor
from model_adapters.deepseek_vl2.tiny import tiny_official_config, tiny_tokenizer



MLA = dict(use_mla=True, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
VARIANTS = {
    "tiny_mha_greedy": {},
    "full_mla_noaux_tc": dict(MLA, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                              routed_scaling_factor=2.0),
}


def tiny_vl2(lang: dict, seed: int = 0):
    """A tiny VLM with routing spread like the contract's other tiny models (weights ~ N(0, 0.08))."""
    model = model_from_config(tiny_official_config(**lang), seed=seed, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.language.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.language.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model


@pytest.fixture(params=list(VARIANTS))
def model(request):
    return tiny_vl2(VARIANTS[request.param])


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _batches(model):
    proc = DeepseekVL2Processor.from_config(tiny_tokenizer(), model)
    convs = [
        [[{"role": "user", "content": "<image>\nWhat is shown in the image?"}],
         [{"role": "user", "content": "Describe it."}]],
        [[{"role": "user", "content": "<image><image>\nCompare the two pictures."}]],
    ]
    images = [[[_image(200, 60, 1)], []], [[_image(90, 90, 2), _image(30, 70, 3)]]]
    return [proc(c, i) for c, i in zip(convs, images, strict=True)]


def test_adapter_is_registered_and_delegates_routing(model):
    adapter = get_adapter(model)
    assert isinstance(adapter, DeepseekVL2Adapter)
    layers = adapter.moe_layers(model)
    lang = model.config.official.language
    assert [la.index for la in layers] == [i for i in range(lang.num_hidden_layers) if lang.is_moe_layer(i)]
    spec = layers[0].spec
    assert spec.num_experts == lang.n_routed_experts and spec.top_k == lang.num_experts_per_tok
    assert spec.scoring is (Scoring.SIGMOID if lang.scoring_func.value == "sigmoid" else Scoring.SOFTMAX)
    assert spec.has_correction_bias == (lang.topk_method.value == "noaux_tc")
    assert spec.norm_topk_prob == lang.norm_topk_prob and spec.routed_scaling_factor == lang.routed_scaling_factor
    assert layers[0].shared_experts is model.language.model.layers[1].mlp.shared_experts
    assert layers[0].path == "language.model.layers.1.mlp"


# The lead's contract (tests/test_interface.py), run on the tiny VLM with text inputs.
@pytest.mark.parametrize("check", [
    contract.test_outputs_unchanged_with_interface_installed,
    contract.test_uninstall_restores_the_model,
    contract.test_routing_equals_the_models_own,
    contract.test_top1_keep_mask_equals_top1_model_and_skips_pruned_pairs,
    contract.test_expert_weights_are_views_and_replacement_is_used,
    contract.test_forward_block_runs_the_moe_block_alone,
    contract.test_layerwise_iteration_reproduces_the_logits,
], ids=lambda f: f.__name__.removeprefix("test_"))
def test_interface_contract(check, model):
    check(model)


def test_image_batches_through_the_interface(model):
    """With images: outputs unchanged, routing equals the model's own router logits, every expert fires."""
    model.set_experts_implementation("eager")
    batches = _batches(model)
    seen = {}
    with torch.no_grad():
        refs = [model(**b).logits for b in batches]
        with expert_interface(model) as iface:
            iface.observe(lambda ev: seen.setdefault(ev.layer.index, []).append(ev.routing))
            outs = [model(**b, output_router_logits=True) for b in batches]
    used = set()
    for b, (ref, out) in enumerate(zip(refs, outs, strict=True)):
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
        for layer, logits in zip(iface.layers, out.router_logits, strict=True):
            r = seen[layer.index][b]
            expect = logits.softmax(-1) if layer.spec.scoring is Scoring.SOFTMAX else logits.sigmoid()
            torch.testing.assert_close(r.probs, expect.float())
            used |= set(r.topk_idx.unique().tolist())
    assert used == set(range(8))  # every expert received tokens
    assert refs[0].abs().mean() > 1e-2


def test_layerwise_with_images_reproduces_the_logits(model):
    batches = _batches(model)
    adapter = get_adapter(model)
    with torch.no_grad():
        refs = [model(**b).logits for b in batches]
        outs = None
        for step in iterate_layers(model, batches, adapter=adapter, progress=False):
            outs = step.run()
        logits = [adapter.lm_head(model)(adapter.language_model(model).norm(h)) for h in outs]
    for a, b in zip(logits, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_calibration_pass_on_image_text_batches(tmp_path):
    model = tiny_vl2({})
    for i, (w, h) in enumerate([(200, 60), (40, 40)]):
        _image(w, h, i).save(tmp_path / f"im{i}.png")
    lines = [
        {"text": "What is shown in the image?", "image": "im0.png"},
        {"text": "<image>\nDescribe the picture.", "image": ["im1.png"], "answer": "A cat."},
        {"text": "Compare them.", "images": ["im0.png", "im1.png"]},
    ]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    samples = load_image_text_samples(tmp_path / "calib.jsonl")
    proc = DeepseekVL2Processor.from_config(tiny_tokenizer(), model)
    batches = list(image_text_batches(proc, samples, batch_size=2))
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 2
    n_img = sum(int(b["images_seq_mask"].sum()) for b in batches)
    crops = [c for b in batches for row in b["images_spatial_crop"].tolist() for c in row if c[0] > 0]
    assert len(crops) == 4 and n_img == sum(proc.num_image_tokens(*c) for c in crops)
    stats = calibrate(model, batches, CalibrationConfig(eps_bits=()), progress=False)
    layer = stats.layers[0] if isinstance(stats.layers, list) else next(iter(stats.layers.values()))
    k = model.config.official.language.num_experts_per_tok
    assert sum(layer.image.counts) == n_img * k  # image tokens, split from text by images_seq_mask
    n_valid = sum(int(b["attention_mask"].sum()) for b in batches)
    assert sum(layer.all.counts) == n_valid * k


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_token_importance_capture_works_on_the_attention(attn):
    """ODP's attention capture (Eq. 6 column statistics) hooks the multi-head attention of the tiny variant."""
    from mcmoe_vl.pruning.importance import AttentionColumnCapture

    model = model_from_config(tiny_official_config(), seed=0, attn_implementation=attn)
    layers = get_adapter(model).moe_layers(model)
    batch = _batches(model)[0]
    with torch.no_grad():
        ref = model(**batch).logits
        with AttentionColumnCapture.for_layers(layers) as capture:
            out = model(**batch).logits
            stats = [capture.pop(la.index) for la in layers]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    valid = batch["attention_mask"].bool()
    for s in stats:
        assert s is not None and s.shape == tuple(valid.shape)
        assert torch.equal(s.valid, valid)
        # Each valid query spreads probability 1 over the keys it sees: column sums add up to the valid queries.
        torch.testing.assert_close(s.colsum.sum(-1), valid.sum(-1).float(), rtol=1e-4, atol=1e-4)
