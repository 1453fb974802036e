"""Tiny DeepSeek-VL2 pieces built offline: a byte-level BPE tokenizer with the DeepSeek-VL2 special tokens and a
small official-layout config. For tests and for training small VLMs on a CPU; real use takes the Hub's tokenizer
(``AutoTokenizer.from_pretrained("deepseek-ai/deepseek-vl2-tiny")``) and checkpoints.

Example::

    tok = tiny_tokenizer()                       # ids: bos 0, eos 1, pad 2, <|User|> 3, <|Assistant|> 4, <image> 5
    cfg = tiny_official_config(vocab_size=512)   # the fixture's geometry: 42-px tiles, 14-px patches
    model = model_from_config(cfg, seed=0)
    processor = DeepseekVL2Processor.from_config(tok, model)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|User|>", "<|Assistant|>", "<image>",
                  "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")

_CORPUS = (
    "A photo of a cat sitting on a red chair next to the window.",
    "What is shown in the image? Describe it in one sentence.",
    "The answer is yes. The answer is no. Answer with the option's letter from the given choices directly.",
    "There are two dogs and three birds in the picture; the sky is blue and the grass is green.",
    "Question: how many people are in the image? Options: A. one B. two C. three D. four",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
)


def tiny_tokenizer(
    vocab_size: int = 384, corpus: Iterable[str] = _CORPUS, special_tokens: tuple[str, ...] = SPECIAL_TOKENS
) -> Any:
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) with DeepSeek-VL2's special tokens first (bos 0, eos 1, pad 2,
    ``<|User|>`` 3, ``<|Assistant|>`` 4, ``<image>`` 5, the grounding tokens 6..10)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(special_tokens[3:]),
    )


_TINY = {
    "model_type": "deepseek_vl_v2",
    "tile_tag": "2D",
    "global_view_pos": "head",
    "candidate_resolutions": [[42, 42], [42, 84], [84, 42], [84, 84]],
    "vision_config": {
        "model_name": "siglip_so400m_patch14_384", "image_size": 42, "patch_size": 14, "width": 64, "layers": 2,
        "heads": 4, "mlp_ratio": 3.7362, "global_pool": "map", "ignore_head": True, "class_token": False,
        "num_classes": 0, "model_type": "vision",
    },
    "projector_config": {
        "projector_type": "downsample_mlp_gelu", "input_dim": 64, "n_embed": 128, "depth": 2, "mlp_ratio": 1,
        "downsample_ratio": 2, "model_type": "mlp_projector",
    },
    "language_config": {
        "vocab_size": 512, "max_position_embeddings": 256, "hidden_size": 128, "intermediate_size": 256,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 2, "n_routed_experts": 8, "num_experts_per_tok": 3, "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "scoring_func": "softmax", "norm_topk_prob": False, "use_mla": False, "kv_lora_rank": None,
        "q_lora_rank": None, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 1,
        "model_type": "deepseek_v2",
    },
}


def tiny_official_config(**language: Any) -> dict[str, Any]:
    """The fixture's tiny geometry (tiny variant: multi-head attention, greedy softmax), language keys overridable.

    ``tiny_official_config(use_mla=True, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)``
    gives latent attention; add ``topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
    routed_scaling_factor=2.0`` for the full model's routing.
    """
    cfg = copy.deepcopy(_TINY)
    cfg["language_config"].update(language)
    return cfg
