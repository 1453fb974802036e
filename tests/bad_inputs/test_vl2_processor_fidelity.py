"""DeepSeek-VL2 processor against the official processor's token layout (deepseek-ai/DeepSeek-VL2,
``processing_deepseek_vl_v2.py``: ``format_messages_v2`` and ``process_one``), rebuilt here independently from the
tokenizer: conversations are tokenized turn by turn, an answer is ``encode(answer.strip()) + [eos]`` right after
``<|Assistant|>:``, ``system_prompt`` is not in the ids of a conversation, and text-only input has one zero tile."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from model_adapters.deepseek_vl2 import model_from_config
from model_adapters.deepseek_vl2.processing import DeepseekVL2Processor
from model_adapters.deepseek_vl2.tiny import tiny_official_config, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return model_from_config(tiny_official_config(), seed=0)


@pytest.fixture(scope="module")
def proc(model):
    return DeepseekVL2Processor.from_config(tiny_tokenizer(), model)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


CONV = [
    {"role": "user", "content": "<image>\nWhat colour?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "<image>\nAnd this one?  "},
    {"role": "assistant", "content": ""},
]


def _official_layout(proc: DeepseekVL2Processor, images: list[Image.Image]) -> tuple[list[int], list[bool]]:
    """The official ids for CONV: bos, per user turn its prompt (image tokens expanded), per answer its stripped
    text + eos; the closing eos of the empty last answer dropped for inference."""
    enc = lambda t: proc.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    eos, img = proc.tokenizer.eos_token_id, proc.image_token_id
    ids, mask = [proc.tokenizer.bos_token_id], [False]

    def user(question: str, image: Image.Image) -> None:
        nonlocal ids, mask
        _, (tw, th) = proc.tile_image(image, cropping=True)
        n = proc.num_image_tokens(tw, th)
        before, after = enc("<|User|>: "), enc(f"\n{question}\n\n<|Assistant|>:")
        ids += before + [img] * n + after
        mask += [False] * len(before) + [True] * n + [False] * len(after)

    user("What colour?", images[0])
    answer = enc("Red.") + [eos]
    ids += answer
    mask += [False] * len(answer)
    user("And this one?", images[1])
    return ids, mask


def test_multi_turn_ids_and_image_mask_match_the_official_layout(proc):
    images = [_image(30, 20, 1), _image(20, 40, 2)]
    sample = proc.process_one(CONV, images)
    ids, mask = _official_layout(proc, images)
    assert sample.input_ids.tolist() == ids
    assert sample.images_seq_mask.tolist() == mask
    # the answer follows the colon directly: no token for a space in between
    colon = proc.tokenizer.encode("<|Assistant|>:", add_special_tokens=False)
    first = ids.index(colon[0])
    start = first + len(colon)
    assert ids[start : start + len(proc.tokenizer.encode("Red.", add_special_tokens=False))] == \
        proc.tokenizer.encode("Red.", add_special_tokens=False)


def test_training_sample_ends_with_the_answer_and_eos(proc):
    conv = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": " A cat. "}]
    sample = proc.process_one(conv, [_image(20, 20)], inference=False)
    answer = proc.tokenizer.encode("A cat.", add_special_tokens=False) + [proc.tokenizer.eos_token_id]
    assert sample.input_ids[-len(answer):].tolist() == answer
    prompt = proc.process_one(conv[:1], [_image(20, 20)])
    assert sample.input_ids[: len(prompt.input_ids)].tolist() == prompt.input_ids.tolist()
    assert len(sample.input_ids) == len(prompt.input_ids) + len(answer)


def test_system_prompt_is_not_in_conversation_ids_and_says_so(proc, caplog):
    conv = [{"role": "user", "content": "Hi"}]
    plain = proc.process_one(conv)
    with caplog.at_level(logging.WARNING):
        with_system = proc.process_one(conv, system_prompt="Be brief.")
    assert torch.equal(with_system.input_ids, plain.input_ids)
    assert "system_prompt is not part of the input ids" in caplog.text
    assert with_system.prompt.startswith("Be brief.\n\n")  # the display string keeps it, as the official one
    # the prompt= path keeps whatever the formatted prompt holds
    formatted = proc.process_one(prompt=proc.format_conversation(conv, "Be brief."))
    assert len(formatted.input_ids) > len(plain.input_ids)


def test_text_only_sample_has_one_zero_tile_and_batches_with_images(proc, model):
    text = proc.process_one([{"role": "user", "content": "Hello there"}])
    assert tuple(text.images.shape) == (1, 3, proc.image_size, proc.image_size)
    assert not text.images.any() and text.images_spatial_crop.tolist() == [[0, 0]]
    assert text.num_image_tokens == [] and not text.images_seq_mask.any()
    with_image = proc.process_one(CONV[:2] + CONV[2:], [_image(30, 20, 1), _image(20, 40, 2)])
    batch = proc.collate([text, with_image])
    with torch.no_grad():
        logits = model(**batch).logits
        for i, s in enumerate((text, with_image)):
            ref = model(**proc.collate([s])).logits[0]
            torch.testing.assert_close(logits[i, -ref.shape[0]:], ref, rtol=1e-5, atol=1e-5)
        # the zero tile is never looked at: the text-only sample equals the language model alone
        alone = model(input_ids=text.input_ids[None]).logits[0]
        torch.testing.assert_close(model(**proc.collate([text])).logits[0], alone, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_declares_a_departing_answer_layout(model):
    """The departure from the official layout is an explicit, per-checkpoint option: the embedded tiny model was
    trained with a space before answers and says so in its config.json; anything else gets the official layout."""
    import copy

    from model_adapters.deepseek_vl2.processing import ANSWER_PREFIX_KEY

    from mcmoe_vl.data.embedded import VLM_TINY_DIR

    assert json.loads((VLM_TINY_DIR / "config.json").read_text())[ANSWER_PREFIX_KEY] == " "
    declared = copy.deepcopy(model.config.official)
    declared.extras[""] = {**declared.extras.get("", {}), ANSWER_PREFIX_KEY: " "}
    spaced = DeepseekVL2Processor.from_config(tiny_tokenizer(), declared)
    official = DeepseekVL2Processor.from_config(tiny_tokenizer(), model)
    assert (spaced.answer_prefix, official.answer_prefix) == (" ", "")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Red."}]
    a = spaced.process_one(conv, inference=False).input_ids.tolist()
    b = official.process_one(conv, inference=False).input_ids.tolist()
    space = spaced.tokenizer.encode(" Red.", add_special_tokens=False)
    assert a[-len(space) - 1 : -1] == space and b[-len(space) - 1 : -1] != space
    declared.extras[""][ANSWER_PREFIX_KEY] = 1
    with pytest.raises(ValueError, match="mcmoe_answer_prefix must be a string"):
        DeepseekVL2Processor.from_config(tiny_tokenizer(), declared)
