"""DeepSeek-VL2 processor: PIL images + a conversation -> ``input_ids``, tiles, crop grid, image-token mask.

What the official ``DeepseekVLV2Processor`` does, step by step:

1. Chat template (``sft_format: deepseek``): ``[system + "\\n\\n"] "<|User|>: " text "\\n\\n" "<|Assistant|>:"``; an
   assistant turn with content adds ``": " answer + eos_text``. ``<image>`` in a user turn marks where an image goes.
2. Tiling per image. The global view is the image padded to ``image_size`` x ``image_size`` (``ImageOps.pad``:
   aspect kept, bicubic, centred on the mean colour). With at most ``max_cropping_images`` (2) images in the
   sample, the local view is the image padded to the best candidate resolution (LLaVA-NeXT
   ``select_best_resolution``: most effective pixels, then least waste) and cut into ``image_size`` tiles,
   row-major; with more images the local view is one ``image_size`` tile. Tiles are normalised with
   ``(x/255 - mean) / std`` (mean = std = 0.5).
3. Tokens per image (``tile_tag: 2D``), with h = w = ceil(image_size / patch_size / downsample_ratio):
   ``h*(w+1)`` for the global view (a newline per row), 1 separator, ``(th*h) * (tw*w + 1)`` for the local tiles.
   All are the image token; ``images_seq_mask`` marks them.
4. ``bos`` first; at inference the prompt ends after ``<|Assistant|>:`` (no eos).
5. Conversations are tokenized turn by turn, as the official ``format_messages_v2`` does: each user turn as
   ``"<|User|>: " question.strip() "\n\n<|Assistant|>:"`` (with its images), each assistant turn as
   ``encode(answer.strip()) + [eos]``, directly after the colon (no space). The ``system_prompt`` is not part of
   the ids on this path (the official processor keeps it only on the ``prompt=`` path and in the display string);
   giving one logs a warning; pass an already formatted ``prompt=`` to have it in the ids. A checkpoint trained with
   another answer layout declares it in its ``config.json`` (``"mcmoe_answer_prefix": " "``: the embedded tiny
   model, trained before this layout was fixed), which :meth:`DeepseekVL2Processor.from_config` picks up.
6. Text-only samples get one all-zero tile and a (0, 0) crop grid, like the official processor.

Batches are left-padded (``pad_token_id``, attention mask 0); tiles and crop grids are zero-padded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .configuration import OfficialConfig

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
_ROLES = {"user": USER, USER: USER, "assistant": ASSISTANT, ASSISTANT: ASSISTANT}
ANSWER_PREFIX_KEY = "mcmoe_answer_prefix"  # config.json key: a checkpoint's own answer layout (see answer_prefix)


def prepare_tokenizer(tokenizer: Any, image_token: str = IMAGE_TOKEN, pad_token: str = PAD_TOKEN) -> int:
    """Register DeepSeek-VL2's special tokens like the official processor does (in place): a pad token when there
    is none, the image token, the grounding tokens and the role tags, each as one unsplittable token. The official
    tokenizers already hold them all (nothing new is added); returns how many tokens were new."""
    n = 0
    if tokenizer.pad_token is None:
        n += tokenizer.add_special_tokens({"pad_token": pad_token})
    n += tokenizer.add_tokens([image_token, *GROUNDING_TOKENS, USER, ASSISTANT], special_tokens=True)
    return n


def select_best_resolution(image_size: tuple[int, int], candidates: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The candidate (width, height) keeping the most image pixels when the image is fitted in; ties: least waste."""
    ow, oh = image_size
    best, best_eff, best_waste = None, 0, math.inf
    for w, h in candidates:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(w), int(h)), eff, waste
    if best is None:
        raise ValueError(f"no candidate resolution fits image of size {image_size}: {list(candidates)}")
    return best


@dataclass
class ProcessedSample:
    """One sample: ``input_ids`` (S,), ``images`` (n_tiles, 3, s, s), ``images_spatial_crop`` (n_images, 2) as
    (width tiles, height tiles), ``images_seq_mask`` (S,), ``num_image_tokens`` per image, and the prompt text."""

    input_ids: torch.Tensor
    images: torch.Tensor
    images_spatial_crop: torch.Tensor
    images_seq_mask: torch.Tensor
    num_image_tokens: list[int]
    prompt: str
    target_ids: torch.Tensor | None = None


@dataclass
class DeepseekVL2Processor:
    """Turns conversations and PIL images into model inputs (see the module docstring).

    ``tokenizer``: any Hugging Face tokenizer that knows the image token (the official one:
    ``AutoTokenizer.from_pretrained("deepseek-ai/deepseek-vl2-tiny")``). Build with :meth:`from_config` to take the
    geometry from the model's config.
    """

    tokenizer: Any
    candidate_resolutions: list[tuple[int, int]]
    image_size: int = 384
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_token: str = IMAGE_TOKEN
    max_cropping_images: int = 2
    global_view_pos: str = "head"
    # Text between "<|Assistant|>:" and a finished answer. "" is the official layout; a checkpoint trained with
    # another one declares it in its config.json under ANSWER_PREFIX_KEY (the embedded tiny model: " ").
    answer_prefix: str = ""
    image_token_id: int = field(init=False)

    def __post_init__(self) -> None:
        added = prepare_tokenizer(self.tokenizer, self.image_token)
        if added:
            log.warning("added %d DeepSeek-VL2 special tokens to the tokenizer (the official tokenizer has them)",
                        added)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self.tokenizer, name) is None:
                raise ValueError(f"the tokenizer has no {name}")
        if self.global_view_pos not in ("head", "tail"):
            raise ValueError(f"global_view_pos={self.global_view_pos!r}; valid: head, tail")
        for w, h in self.candidate_resolutions:
            if w % self.image_size or h % self.image_size:
                raise ValueError(f"candidate resolution {(w, h)} is not a multiple of image_size={self.image_size}")

    @classmethod
    def from_config(cls, tokenizer: Any, config: OfficialConfig | Any, **kw: Any) -> DeepseekVL2Processor:
        """From the model's parsed official config (or a model / DeepseekVL2Config carrying one)."""
        official = getattr(getattr(config, "config", config), "official", config)
        if not isinstance(official, OfficialConfig):
            raise TypeError(f"expected an OfficialConfig, a DeepseekVL2Config or a model, got {type(config).__name__}")
        declared = official.extras.get("", {}).get(ANSWER_PREFIX_KEY)
        if declared is not None and "answer_prefix" not in kw:
            if not isinstance(declared, str):
                raise ValueError(f"config.json: {ANSWER_PREFIX_KEY} must be a string, got {declared!r}")
            log.info("answers follow '<|Assistant|>:' after %r, as the checkpoint's config declares (official: '')",
                     declared)
            kw["answer_prefix"] = declared
        proc = cls(
            tokenizer=tokenizer,
            candidate_resolutions=[tuple(r) for r in official.candidate_resolutions],
            image_size=official.vision.image_size,
            patch_size=official.vision.patch_size,
            downsample_ratio=official.projector.downsample_ratio,
            global_view_pos=official.global_view_pos,
            **kw,
        )
        vocab = official.language.vocab_size
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (proc.image_token, *GROUNDING_TOKENS, USER, ASSISTANT)}
        ids.update(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
        outside = {t: i for t, i in ids.items() if i is None or i >= vocab}
        if outside:
            raise ValueError(f"tokenizer ids {outside} are outside the model's vocabulary of {vocab}; use the "
                             "model's own tokenizer")
        return proc

    # -- text -------------------------------------------------------------------------------------------------------
    @property
    def eos_text(self) -> str:
        return self.tokenizer.eos_token

    def format_conversation(self, conversation: Sequence[dict[str, Any]], system_prompt: str = "") -> str:
        """The ``deepseek`` chat template. ``conversation``: dicts with ``role`` (user / assistant or the official
        ``<|User|>`` / ``<|Assistant|>``) and ``content``; an empty last assistant turn asks for a reply."""
        seps = ("\n\n", self.eos_text)
        out = system_prompt + seps[0] if system_prompt else ""
        expect = USER
        for i, msg in enumerate(conversation):
            role = _ROLES.get(msg.get("role", ""))
            if role is None:
                raise ValueError(f"message {i}: role {msg.get('role')!r}; valid: user, assistant")
            if role != expect:
                raise ValueError(f"message {i}: expected a {expect} turn (turns alternate, starting with the user)")
            expect = ASSISTANT if role == USER else USER
            content = (msg.get("content") or "").strip()
            out += f"{role}: {content}{seps[i % 2]}" if content else f"{role}:"
        if expect == ASSISTANT:  # ends with a user turn: open the assistant's
            out += f"{ASSISTANT}:"
        return out

    def conversation_turns(self, conversation: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
        """The text the official processor tokenizes for each turn, with whether an eos follows it: a user turn
        becomes its own prompt ``"<|User|>: q\n\n<|Assistant|>:"``, an assistant turn its stripped answer + eos."""
        self.format_conversation(conversation)  # validates roles and turn order
        turns: list[tuple[str, bool]] = []
        for msg in conversation:
            content = (msg.get("content") or "").strip()
            if _ROLES[msg["role"]] == USER:
                turns.append((f"{USER}: {content}\n\n{ASSISTANT}:" if content else f"{USER}:{ASSISTANT}:", False))
            else:
                turns.append((self.answer_prefix + content if content else content, True))
        return turns

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    # -- images -----------------------------------------------------------------------------------------------------
    @property
    def tokens_per_side(self) -> int:
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    def num_image_tokens(self, width_tiles: int, height_tiles: int) -> int:
        """Image tokens for one image with a (width_tiles x height_tiles) local grid."""
        h = w = self.tokens_per_side
        return h * (w + 1) + 1 + (height_tiles * h) * (width_tiles * w + 1)

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        x = np.asarray(img, dtype=np.float32) / 255.0  # (s, s, 3)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def tile_image(self, image: Image.Image, cropping: bool) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Global view + local tiles of one image, and (width tiles, height tiles)."""
        image = image.convert("RGB")
        s = self.image_size
        best_w, best_h = select_best_resolution(image.size, self.candidate_resolutions) if cropping else (s, s)
        fill = tuple(int(m * 255) for m in self.image_mean)
        tiles = [self._to_tensor(ImageOps.pad(image, (s, s), color=fill))]
        local = ImageOps.pad(image, (best_w, best_h), color=fill)
        for top in range(0, best_h, s):
            for left in range(0, best_w, s):
                tiles.append(self._to_tensor(local.crop((left, top, left + s, top + s))))
        return tiles, (best_w // s, best_h // s)

    # -- one sample --------------------------------------------------------------------------------------------------
    def process_one(
        self,
        conversation: Sequence[dict[str, Any]] | None = None,
        images: Sequence[Image.Image] | None = None,
        *,
        prompt: str | None = None,
        system_prompt: str = "",
        inference: bool = True,
    ) -> ProcessedSample:
        """One conversation (or an already formatted ``prompt``) with its images, in ``<image>`` order.

        ``inference=True`` ends the ids after the prompt (no eos), as for generation; ``False`` appends eos and
        returns ``target_ids`` (image positions -100) for training.
        """
        if (conversation is None) == (prompt is None):
            raise ValueError("give exactly one of conversation and prompt")
        turns, ends_with_answer, prompt, images = self._sample_turns(conversation, images, prompt, system_prompt)
        ids, mask, tiles, crops, n_tokens = self._encode_turns(turns, images)
        if inference and ends_with_answer:  # the official processor drops the closing eos for generation
            ids, mask = ids[:-1], mask[:-1]
        input_ids = torch.tensor(ids, dtype=torch.long)
        seq_mask = torch.tensor(mask, dtype=torch.bool)
        image_tensor, crop_tensor = self._image_tensors(tiles, crops)
        target = None if inference else input_ids.masked_fill(seq_mask, -100)
        return ProcessedSample(input_ids, image_tensor, crop_tensor, seq_mask, n_tokens, prompt, target)

    def _sample_turns(
        self,
        conversation: Sequence[dict[str, Any]] | None,
        images: Sequence[Image.Image] | None,
        prompt: str | None,
        system_prompt: str,
    ) -> tuple[list[tuple[str, bool]], bool, str, list[Image.Image]]:
        """The turns to tokenize (text, eos after it), whether the last one is an answer, the display prompt, and
        the images in ``<image>`` order (``images`` first, then those inside the conversation's messages)."""
        if prompt is None:
            images = list(images or []) + [im for m in conversation for im in m.get("images", []) or []
                                           if not isinstance(im, str)]
            if system_prompt:
                log.warning("system_prompt is not part of the input ids of a conversation (as in the official "
                            "processor); format the prompt yourself and pass prompt= to include it")
            prompt = self.format_conversation(conversation, system_prompt)  # the display string
            turns = self.conversation_turns(conversation)
            ends_with_answer = turns[-1][1]
        else:
            turns, ends_with_answer = [(prompt, True)], True
        return turns, ends_with_answer, prompt, list(images or [])

    def _encode_turns(
        self, turns: Sequence[tuple[str, bool]], images: Sequence[Image.Image]
    ) -> tuple[list[int], list[bool], list[torch.Tensor], list[tuple[int, int]], list[int]]:
        """bos, then each turn's tokens with every ``<image>`` tag replaced by its image's tokens, eos after each
        answer. Returns the ids, the image-token mask, the tiles, the crop grids and the image tokens per image."""
        n_tags = sum(text.count(self.image_token) for text, _ in turns)
        if n_tags != len(images):
            raise ValueError(f"the text has {n_tags} {self.image_token} tags but {len(images)} images were given")
        cropping = len(images) <= self.max_cropping_images
        ids: list[int] = [self.tokenizer.bos_token_id]
        mask: list[bool] = [False]
        tiles: list[torch.Tensor] = []
        crops: list[tuple[int, int]] = []
        n_tokens: list[int] = []
        pending = iter(images)
        for text, eos_after in turns:
            splits = text.split(self.image_token)
            for i, piece in enumerate(splits):
                t = self._encode(piece)
                ids += t
                mask += [False] * len(t)
                if i == len(splits) - 1:
                    break
                img_tiles, (tw, th) = self.tile_image(next(pending), cropping)
                tiles += img_tiles
                crops.append((tw, th))
                n = self.num_image_tokens(tw, th)
                ids += [self.image_token_id] * n
                mask += [True] * n
                n_tokens.append(n)
            if eos_after:
                ids.append(self.tokenizer.eos_token_id)
                mask.append(False)
        return ids, mask, tiles, crops, n_tokens

    def _image_tensors(
        self, tiles: list[torch.Tensor], crops: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked tiles (n_tiles, 3, s, s) and crop grids (n_images, 2)."""
        if tiles:
            return torch.stack(tiles), torch.tensor(crops, dtype=torch.long)
        # text only: one zero tile and a (0, 0) crop grid, as the official processor returns
        return torch.zeros(1, 3, self.image_size, self.image_size), torch.zeros(1, 2, dtype=torch.long)

    # -- batches -----------------------------------------------------------------------------------------------------
    def collate(self, samples: Sequence[ProcessedSample]) -> dict[str, torch.Tensor]:
        """Left-pad a list of samples into model inputs (``input_ids``, ``attention_mask``, ``images``,
        ``images_seq_mask``, ``images_spatial_crop``; ``labels`` when the samples have targets)."""
        if not samples:
            raise ValueError("no samples")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        b = len(samples)
        seq = max(len(s.input_ids) for s in samples)
        tiles = max(1, max(len(s.images) for s in samples))
        n_img = max(1, max(len(s.images_spatial_crop) for s in samples))
        s_img = self.image_size
        out = {
            "input_ids": torch.full((b, seq), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(b, seq, dtype=torch.long),
            "images_seq_mask": torch.zeros(b, seq, dtype=torch.bool),
            "images": torch.zeros(b, tiles, 3, s_img, s_img),
            "images_spatial_crop": torch.zeros(b, n_img, 2, dtype=torch.long),
        }
        with_labels = all(s.target_ids is not None for s in samples)
        if with_labels:
            out["labels"] = torch.full((b, seq), -100, dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            out["input_ids"][i, seq - n :] = s.input_ids
            out["attention_mask"][i, seq - n :] = 1
            out["images_seq_mask"][i, seq - n :] = s.images_seq_mask
            out["images"][i, : len(s.images)] = s.images
            out["images_spatial_crop"][i, : len(s.images_spatial_crop)] = s.images_spatial_crop
            if with_labels:
                out["labels"][i, seq - n :] = s.target_ids
        return out

    def __call__(
        self,
        conversations: Sequence[Sequence[dict[str, Any]]] | None = None,
        images: Sequence[Sequence[Image.Image]] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        system_prompt: str = "",
        inference: bool = True,
    ) -> dict[str, torch.Tensor]:
        """A batch: conversations (or formatted prompts) with their per-sample image lists."""
        items = conversations if conversations is not None else prompts
        if items is None:
            raise ValueError("give conversations or prompts")
        images = images if images is not None else [[] for _ in items]
        if len(images) != len(items):
            raise ValueError(f"{len(items)} samples but {len(images)} image lists")
        samples = [
            self.process_one(c, im, system_prompt=system_prompt, inference=inference)
            if conversations is not None
            else self.process_one(prompt=c, images=im, inference=inference)
            for c, im in zip(items, images, strict=True)
        ]
        return self.collate(samples)
