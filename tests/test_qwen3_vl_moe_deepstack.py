"""Qwen3-VL-MoE's deepstack features in the layer-by-layer pass: after decoder layers 0 and 1 the tiny model's text
model adds the features of its two vision blocks at the image positions, outside the layers. The adapter's
``layer_additions`` (model_adapters.qwen3_vl_moe.DeepstackAdditions) lets the replay pass on what the model's own
forward passes on: every decoder layer's input, every MoE block's input and routing, the final hidden states and the
calibration statistics equal those of the unmodified model's forward on image batches.

Not vacuous: without the additions the replay's layer-1 inputs, MoE tokens and statistics differ from the model's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_qwen3_vl_moe, tiny_qwen3_vl_tokenizer

from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate, layer_statistics
from mcmoe_vl.calibration.image_text import ImageTextSample
from mcmoe_vl.moe.layerwise import IMAGE_MASK_KEY, CapturedLayer, iterate_layers
from model_adapters import expert_interface, get_adapter
from model_adapters.qwen3_vl_moe import Qwen3VLMoeAdapter

CFG = CalibrationConfig(eps_bits=(2,), group_size=8, min_tokens=0)


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_qwen3_vl_moe(), tiny_qwen3_vl_tokenizer()
    adapter = get_adapter(model)
    assert model.config.vision_config.deepstack_visual_indexes == [0, 1]
    rng = np.random.default_rng(1)
    questions = ["What colour is the big square?", "Count the dots.", "Which shape is it?", "Left?"]  # padding
    samples = [ImageTextSample(q, [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))])
               for q in questions]
    batches = adapter.calibration_batches(adapter.load_processor(tok, model), samples, batch_size=2)
    return model, batches


def _own_forward(model, batches):
    """Plain hooks on the unmodified model: each decoder layer's input, each MoE block's input and the final
    hidden states (the input of the final norm), per batch."""
    adapter = get_adapter(model)
    layers, lm = adapter.decoder_layers(model), adapter.language_model(model)
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(key):
        def hook(module, args, kwargs):
            seen.setdefault(key, []).append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    handles = [la.register_forward_pre_hook(keep(f"layer{i}"), with_kwargs=True) for i, la in enumerate(layers)]
    handles += [la.mlp.register_forward_pre_hook(keep(f"moe{i}"), with_kwargs=True) for i, la in enumerate(layers)]
    handles.append(lm.norm.register_forward_pre_hook(keep("final"), with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                model(**{k: v for k, v in b.items() if k != IMAGE_MASK_KEY})
    finally:
        for h in handles:
            h.remove()
    return seen


def _replay(model, batches):
    """The same quantities from the layer-by-layer pass (MoE tokens of the real tokens only)."""
    seen: dict[str, list[torch.Tensor]] = {}
    with expert_interface(model) as iface:
        for step in iterate_layers(model, batches, adapter=iface.adapter, progress=False):
            seen[f"layer{step.index}"] = [inp.hidden for inp in step.inputs]
            seen[f"moe{step.index}"] = step.capture(iface).tokens
            seen["final"] = step.outputs
    return seen


def _real(hidden: torch.Tensor, batch) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])[batch["attention_mask"].reshape(-1).bool()]


def test_replay_passes_on_what_the_models_own_forward_passes_on(setup):
    model, batches = setup
    ref, got = _own_forward(model, batches), _replay(model, batches)
    for i in range(2):
        for r, g in zip(ref[f"layer{i}"], got[f"layer{i}"], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        for r, g, b in zip(ref[f"moe{i}"], got[f"moe{i}"], batches, strict=True):
            torch.testing.assert_close(g, _real(r, b), rtol=1e-5, atol=1e-6)
    for r, g in zip(ref["final"], got["final"], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_without_the_additions_the_replay_differs(setup, monkeypatch):
    model, batches = setup
    ref = _own_forward(model, batches)
    monkeypatch.setattr(Qwen3VLMoeAdapter, "layer_additions", lambda self, model: None)
    got = _replay(model, batches)
    for r, g, b in zip(ref["layer1"], got["layer1"], batches, strict=True):
        image = b["image_token_mask"]
        assert (g - r)[image].abs().min() > 0 and (g - r)[image].abs().max() > 1e-2  # the features are missing
        torch.testing.assert_close(g[~image], r[~image], rtol=1e-5, atol=1e-6)  # only there
    for r, g in zip(ref["final"], got["final"], strict=True):
        assert (g - r).abs().max() > 1e-2


def _statistics_of_the_own_forward(model, batches):
    """Calibration statistics of each MoE layer from the model's own forward, observed at the MoE blocks."""
    tokens: dict[int, list] = {}
    with expert_interface(model) as iface:
        iface.observe(lambda ev: tokens.setdefault(ev.layer.index, []).append((ev.hidden, ev.routing)))
        with torch.no_grad():
            for b in batches:
                model(**{k: v for k, v in b.items() if k != IMAGE_MASK_KEY})
        out = []
        for la in iface.layers:
            keep = [b["attention_mask"].reshape(-1).bool() for b in batches]
            image = [b["image_token_mask"].reshape(-1)[k] for b, k in zip(batches, keep, strict=True)]
            seen = tokens[la.index]
            routing = [type(r)(probs=r.probs[k], topk_idx=r.topk_idx[k], topk_weight=r.topk_weight[k])
                       for (_, r), k in zip(seen, keep, strict=True)]
            cap = CapturedLayer(la.index, [x[k] for (x, _), k in zip(seen, keep, strict=True)], routing,
                                [b["attention_mask"].bool() for b in batches], image)
            with torch.no_grad():
                out.append(layer_statistics(la, cap, CFG))
    return out


def _numbers(x) -> list[float]:
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _numbers(x[k])]
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in _numbers(item)]
    return [float(x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_calibration_statistics_equal_those_of_the_models_own_forward(setup, monkeypatch):
    model, batches = setup
    ref = _statistics_of_the_own_forward(model, batches)
    stats = calibrate(model, batches, CFG, progress=False)
    assert [la.index for la in stats.layers] == [la.index for la in ref] == [0, 1]
    for got, want in zip(stats.layers, ref, strict=True):
        g, w = got.model_dump(mode="json"), want.model_dump(mode="json")
        assert g["all"]["counts"] == w["all"]["counts"] and g["image"]["counts"] == w["image"]["counts"]
        assert g["image"]["num_tokens"] == sum(int(b["image_token_mask"].sum()) for b in batches)
        torch.testing.assert_close(_numbers(g), _numbers(w), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(Qwen3VLMoeAdapter, "layer_additions", lambda self, model: None)
    skipped = calibrate(model, batches, CFG, progress=False)  # layer 1's inputs miss the features added after 0
    assert _numbers(skipped.layers[1].model_dump(mode="json")) != pytest.approx(_numbers(ref[1].model_dump()))


def test_image_batches_are_refused_when_the_text_model_does_not_take_the_deepstack_features(setup, monkeypatch):
    """A transformers version whose text model receives the features otherwise cannot be replayed: refused before
    any work, naming the arguments; text-only batches are still accepted."""
    model, batches = setup
    adapter = get_adapter(model)
    lm = adapter.language_model(model)
    monkeypatch.setattr(lm, "forward", lambda input_ids=None, inputs_embeds=None, **kwargs: None)
    with pytest.raises(NotImplementedError, match="deepstack_visual_embeds"):
        adapter.check_layerwise(model, batches)
    adapter.check_layerwise(model, [{k: v for k, v in b.items() if k != "pixel_values"} for b in batches])
