"""DeepSeek-VL2 processor: chat template, dynamic tiling paths, token layout consistent with the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model_adapters.deepseek_vl2 import model_from_config
from model_adapters.deepseek_vl2.processing import DeepseekVL2Processor, select_best_resolution
from model_adapters.deepseek_vl2.tiny import tiny_official_config, tiny_tokenizer




@pytest.fixture(scope="module")
def model():
    return model_from_config(tiny_official_config(), seed=0)


@pytest.fixture(scope="module")
def processor(model):
    return DeepseekVL2Processor.from_config(tiny_tokenizer(), model)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ask(n_images: int, text: str = "What is shown?") -> list[dict]:
    return [{"role": "user", "content": "<image>\n" * n_images + text}, {"role": "assistant", "content": ""}]


def test_chat_template(processor):
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "<image>\nWhat?"},
        {"role": "assistant", "content": ""},
    ]
    eos = processor.tokenizer.eos_token
    assert processor.format_conversation(conv) == (
        f"<|User|>: Hi\n\n<|Assistant|>: Hello{eos}<|User|>: <image>\nWhat?\n\n<|Assistant|>:"
    )
    assert processor.format_conversation(conv[:1], system_prompt="Be brief.") == (
        "Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>:"
    )
    with pytest.raises(ValueError, match="role"):
        processor.format_conversation([{"role": "system", "content": "x"}])


def _brute_best(size, candidates):
    # Independent reading: maximise kept pixels, then minimise padding.
    ow, oh = size

    def key(c):
        s = min(c[0] / ow, c[1] / oh)
        eff = min(int(ow * s) * int(oh * s), ow * oh)
        return (eff, -(c[0] * c[1] - eff))

    return tuple(max(candidates, key=key))


@pytest.mark.parametrize("size, expect", [((20, 20), (42, 42)), ((200, 200), (84, 84)), ((200, 60), (84, 42)),
                                          ((60, 200), (42, 84)), ((84, 42), (84, 42))])
def test_select_best_resolution(processor, size, expect):
    cands = processor.candidate_resolutions
    assert select_best_resolution(size, cands) == expect == _brute_best(size, cands)


@pytest.mark.parametrize(
    "sizes, crops",
    [
        ([(20, 20)], [(1, 1)]),  # small: one local tile
        ([(200, 200)], [(2, 2)]),  # large: 2x2 local tiles
        ([(200, 60)], [(2, 1)]),  # wide
        ([(200, 200), (60, 200)], [(2, 2), (1, 2)]),  # two images still get local tiles
        ([(200, 200), (200, 60), (20, 20)], [(1, 1)] * 3),  # three images: no local tiling
    ],
)
def test_tiling_paths_and_token_counts_match_the_model(processor, model, sizes, crops):
    images = [_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    sample = processor.process_one(_ask(len(images)), images)
    assert sample.images_spatial_crop.tolist() == [list(c) for c in crops]
    assert sample.images.shape == (sum(1 + w * h for w, h in crops), 3, 42, 42)
    h = processor.tokens_per_side
    assert h == 2  # 42 px / 14 px = 3 patches, padded to 4, merged 2x2
    expect = [h * (h + 1) + 1 + (th * h) * (tw * h + 1) for tw, th in crops]
    assert sample.num_image_tokens == expect
    assert int(sample.images_seq_mask.sum()) == sum(expect)
    assert sample.input_ids[sample.images_seq_mask].eq(processor.image_token_id).all()
    assert not sample.input_ids[~sample.images_seq_mask].eq(processor.image_token_id).any()
    assert sample.input_ids[0] == processor.tokenizer.bos_token_id
    # Image-token runs are contiguous per image, in order.
    runs = torch.diff(sample.images_seq_mask.int(), prepend=torch.tensor([0])).eq(1).sum()
    assert int(runs) == len(images)
    # The model places exactly that many embeddings (it raises otherwise).
    batch = processor.collate([sample])
    emb = model.image_embeddings(batch["images"], batch["images_spatial_crop"])
    assert emb[0].shape[0] == sum(expect)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_tiles_are_the_normalised_pixels(processor):
    img = _image(84, 42, 7)  # exactly the (2 x 1) candidate: no resampling of the local view
    tiles, grid = processor.tile_image(img, cropping=True)
    assert grid == (2, 1) and len(tiles) == 3
    px = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    norm = (px - 0.5) / 0.5
    torch.testing.assert_close(tiles[1], norm[:, :, :42])
    torch.testing.assert_close(tiles[2], norm[:, :, 42:])
    # Global view: the 84x42 image fitted into 42x42 (centred, mean-colour padding above and below).
    assert tiles[0].shape == (3, 42, 42)
    assert torch.allclose(tiles[0][:, :5], torch.zeros(3, 5, 42), atol=1 / 255)


def test_mismatched_image_count_is_an_error(processor):
    with pytest.raises(ValueError, match="2 <image> tags but 1 images"):
        processor.process_one(_ask(2), [_image(20, 20)])


def test_left_padded_batch_equals_single_samples(processor, model):
    convs = [_ask(1, "What is shown in the image? Describe it."), _ask(0, "Hi")]
    images = [[_image(200, 60, 1)], []]
    batch = processor(convs, images)
    assert batch["attention_mask"][1, 0] == 0  # the shorter sample is left-padded
    with torch.no_grad():
        logits = model(**batch).logits
        for i in range(2):
            single = processor([convs[i]], [images[i]])
            ref = model(**single).logits[0]
            n = ref.shape[0]
            torch.testing.assert_close(logits[i, -n:], ref, rtol=1e-5, atol=1e-5)


def test_training_targets(processor):
    sample = processor.process_one(
        [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}],
        [_image(20, 20)],
        inference=False,
    )
    assert sample.input_ids[-1] == processor.tokenizer.eos_token_id
    assert (sample.target_ids[sample.images_seq_mask] == -100).all()
    assert torch.equal(sample.target_ids[~sample.images_seq_mask], sample.input_ids[~sample.images_seq_mask])


def test_real_geometry_384px_tiles():
    """384-px tiles with 14-px patches: a 27x27 grid (6 pixels unused), padded to 28x28, 14x14 tokens per tile."""
    cfg = tiny_official_config()
    cfg["vision_config"].update(image_size=384, width=32, layers=1, heads=2)
    cfg["projector_config"].update(input_dim=32)
    cfg["candidate_resolutions"] = [[384, 384], [384, 768], [768, 384], [768, 768], [1152, 384]]
    model = model_from_config(cfg, seed=0)
    proc = DeepseekVL2Processor.from_config(tiny_tokenizer(), model)
    assert proc.tokens_per_side == 14
    sample = proc.process_one(_ask(1), [_image(1000, 330, 3)])  # wide: 3 x 1 tiles
    assert sample.images_spatial_crop.tolist() == [[3, 1]]
    assert sample.num_image_tokens == [14 * 15 + 1 + 14 * (3 * 14 + 1)]
    batch = proc.collate([sample])
    with torch.no_grad():
        feats = model.vision_features(batch["images"][0, :1])
        assert feats.shape == (1, 27 * 27, 32)
        assert model.projector(feats).shape == (1, 14 * 14, 128)
        emb = model.image_embeddings(batch["images"], batch["images_spatial_crop"])
    assert emb[0].shape[0] == int(sample.images_seq_mask.sum())


def test_special_tokens_are_registered_like_the_official_processor():
    from model_adapters.deepseek_vl2.processing import GROUNDING_TOKENS, prepare_tokenizer
    from model_adapters.deepseek_vl2.tiny import SPECIAL_TOKENS

    tok = tiny_tokenizer(special_tokens=SPECIAL_TOKENS[:6])  # without the grounding tokens
    n0 = len(tok)
    assert prepare_tokenizer(tok) == len(GROUNDING_TOKENS)
    assert prepare_tokenizer(tok) == 0 and len(tok) == n0 + len(GROUNDING_TOKENS)
    for t in ("<|User|>", "<|Assistant|>", "<image>", *GROUNDING_TOKENS):
        assert tok.encode(f"a{t}b", add_special_tokens=False)[1] == tok.convert_tokens_to_ids(t)
    cfg = tiny_official_config(vocab_size=300)  # the added tokens' ids (384..388) would not exist in the model
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        DeepseekVL2Processor.from_config(tok, model_from_config(cfg, seed=0))


def test_training_loss_and_gradients(processor, model):
    sample = processor.process_one(
        [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}],
        [_image(90, 40)],
        inference=False,
    )
    batch = processor.collate([sample])
    model.zero_grad()
    out = model(**batch)
    labels = batch["labels"][0, 1:]
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(out.logits[0, :-1][keep].float(), labels[keep])
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    for name in ("vision.embeddings.patch_embedding.weight", "projector.layers.0.weight", "image_newline",
                 "view_seperator", "language.model.layers.1.mlp.experts.gate_up_proj"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.zero_grad()
