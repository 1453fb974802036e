"""DeepSeek-VL2 configuration: the official ``config.json`` parsed, checked, and turned into transformers configs.

An official checkpoint's ``config.json`` (``model_type: deepseek_vl_v2``) has three sections:

- ``language_config``: a DeepSeek-V2-style MoE decoder. The attention is chosen by ``use_mla``: standard
  multi-head attention (``deepseek-vl2-tiny``) or DeepSeek latent attention (MLA, ``-small`` and the full model,
  ``kv_lora_rank`` / ``q_lora_rank``). The routing by ``topk_method`` and ``scoring_func``: ``greedy`` softmax top-k
  (tiny, small) or ``noaux_tc`` sigmoid top-k with a correction bias, ``norm_topk_prob`` and a routed scaling factor
  (full).
- ``vision_config``: a SigLIP ViT (timm layout: ``width``, ``layers``, ``heads``, ``mlp_ratio``).
- ``projector_config``: ``downsample_mlp_gelu``.

plus the image layout (``tile_tag``, ``global_view_pos``, ``candidate_resolutions``).

:func:`parse_official_config` validates all of it and refuses configs the official code would compute differently
from this port (or that contradict themselves) with an error naming the key. Keys that only carry the generic
``PretrainedConfig`` bookkeeping of transformers 4.38 are accepted and kept, so that the config round-trips; any
other unknown key is reported.

The sections themselves (:class:`LanguageConfig`, :class:`VisionConfig`, :class:`ProjectorConfig`) and their checks
are in :mod:`.config_sections`; this module puts them together.

Example::

    cfg = parse_official_config(json.load(open("config.json")))
    cfg.language.attention      # Attention.MHA or Attention.MLA
    cfg.language.routing_family # "deepseek_v2" (softmax greedy) or "deepseek_v3" (sigmoid noaux_tc)
    hf = DeepseekVL2Config.from_official(cfg)   # what the model classes take
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import model_validator
from transformers import DeepseekV2Config, DeepseekV3Config, PreTrainedConfig, SiglipVisionConfig

from .config_sections import LanguageConfig, ProjectorConfig, Section, VisionConfig

log = logging.getLogger(__name__)

MODEL_TYPE = "deepseek_vl_v2"

# Bookkeeping keys written by transformers' PretrainedConfig.to_dict() (4.x) and by the official repository; they do
# not change the architecture. They are kept verbatim for saving.
GENERIC_KEYS = frozenset(
    {
        "mcmoe_answer_prefix",  # read by the processor (processing.ANSWER_PREFIX_KEY), kept in extras
        "return_dict", "output_hidden_states", "output_attentions", "torchscript", "torch_dtype", "dtype",
        "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
        "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length",
        "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
        "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
        "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
        "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "architectures", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id",
        "decoder_start_token_id", "task_specific_params", "problem_type", "_name_or_path", "transformers_version",
        "model_type", "auto_map", "_attn_implementation", "num_labels", "use_cache", "bos_token_id", "eos_token_id",
        "pad_token_id", "tie_word_embeddings",
        # DeepseekV2Config of the official repository: training-only or unused switches.
        "ep_size", "aux_loss_alpha", "seq_aux", "pretraining_tp", "lm_head", "rm_head", "initializer_range",
        # vision_config: training-only switches of the official VisionTransformer.
        "use_checkpoint", "weight_init", "deterministic", "num_recomputing_layers",
    }
)

class OfficialConfig(Section):
    """The whole official config, parsed. ``extras`` keeps the bookkeeping keys for a faithful round trip."""

    language: LanguageConfig
    vision: VisionConfig
    projector: ProjectorConfig
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: list[tuple[int, int]] = [(384, 384)]
    extras: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check(self) -> OfficialConfig:
        if self.tile_tag != "2D":
            raise ValueError(f"tile_tag={self.tile_tag!r} is not supported; valid: 2D")
        if self.global_view_pos not in ("head", "tail"):
            raise ValueError(f"global_view_pos={self.global_view_pos!r}; valid: head, tail")
        if self.projector.input_dim != self.vision.width:
            raise ValueError(
                f"projector_config.input_dim={self.projector.input_dim} != vision_config.width={self.vision.width}"
            )
        if self.projector.n_embed != self.language.hidden_size:
            raise ValueError(
                f"projector_config.n_embed={self.projector.n_embed} != language_config.hidden_size="
                f"{self.language.hidden_size}"
            )
        size = self.vision.image_size
        for w, h in self.candidate_resolutions:
            if w % size or h % size or w <= 0 or h <= 0:
                raise ValueError(f"candidate resolution {(w, h)} is not a positive multiple of image_size={size}")
        return self

    @property
    def tokens_per_side(self) -> int:
        """Image-embedding grid side per tile after the projector: ceil(patch grid / downsample_ratio)."""
        r = self.projector.downsample_ratio
        return -(-self.vision.grid // r)

    def to_official_dict(self) -> dict[str, Any]:
        """The config in the official ``config.json`` layout."""
        out: dict[str, Any] = dict(self.extras.get("", {}))
        for name, section in (("language_config", self.language), ("vision_config", self.vision),
                              ("projector_config", self.projector)):
            d = dict(self.extras.get(name, {}))
            d.update(section.model_dump(mode="json", exclude_unset=True))  # what the source said
            out[name] = d
        out.update(
            tile_tag=self.tile_tag,
            global_view_pos=self.global_view_pos,
            candidate_resolutions=[list(r) for r in self.candidate_resolutions],
            model_type=MODEL_TYPE,
        )
        return out


def _split(section: dict[str, Any], model: type[Section], where: str) -> tuple[dict, dict]:
    known = set(model.model_fields)
    sem = {k: v for k, v in section.items() if k in known}
    extra = {k: v for k, v in section.items() if k not in known}
    unknown = sorted(k for k in extra if k not in GENERIC_KEYS)
    if unknown:
        log.warning("%s: keys not used by DeepSeek-VL2 (kept as they are): %s", where, unknown)
    return sem, extra


def parse_official_config(config: dict[str, Any]) -> OfficialConfig:
    """Parse and check an official DeepSeek-VL2 ``config.json`` dict (see the module docstring)."""
    if not isinstance(config, dict):
        raise TypeError(f"expected the config.json dict, got {type(config).__name__}")
    mt = config.get("model_type")
    if mt != MODEL_TYPE:
        raise ValueError(f"config.json: model_type={mt!r}; a DeepSeek-VL2 checkpoint has {MODEL_TYPE!r}")
    missing = [k for k in ("language_config", "vision_config", "projector_config") if k not in config]
    if missing:
        raise ValueError(f"config.json: missing sections {missing}")
    lang, lang_x = _split(config["language_config"], LanguageConfig, "language_config")
    vis, vis_x = _split(config["vision_config"], VisionConfig, "vision_config")
    proj, proj_x = _split(config["projector_config"], ProjectorConfig, "projector_config")
    top_known = {"language_config", "vision_config", "projector_config", "tile_tag", "global_view_pos",
                 "candidate_resolutions"}
    top_x = {k: v for k, v in config.items() if k not in top_known}
    unknown = sorted(k for k in top_x if k not in GENERIC_KEYS)
    if unknown:
        log.warning("config.json: keys not used by DeepSeek-VL2 (kept as they are): %s", unknown)
    top = {k: config[k] for k in ("tile_tag", "global_view_pos", "candidate_resolutions") if k in config}
    return OfficialConfig(
        language=LanguageConfig(**lang),
        vision=VisionConfig(**vis),
        projector=ProjectorConfig(**proj),
        extras={"": top_x, "language_config": lang_x, "vision_config": vis_x, "projector_config": proj_x},
        **top,
    )


# -- transformers configs -------------------------------------------------------------------------------------------


def text_config_from_official(lang: LanguageConfig) -> DeepseekV2Config | DeepseekV3Config:
    """The transformers config of the language model.

    MLA: ``DeepseekV2Config`` for softmax routing, ``DeepseekV3Config`` for sigmoid ``noaux_tc`` (transformers' V2
    ignores ``norm_topk_prob`` and has no ``noaux_tc``). Multi-head attention: the same configs with the rotary part
    covering the whole head (``qk_rope_head_dim = head_dim``, ``qk_nope_head_dim = 0``, ``kv_lora_rank = 0``);
    ``use_mla`` says which attention the model builds.
    """
    common: dict[str, Any] = dict(
        vocab_size=lang.vocab_size,
        hidden_size=lang.hidden_size,
        intermediate_size=lang.intermediate_size,
        moe_intermediate_size=lang.moe_intermediate_size,
        num_hidden_layers=lang.num_hidden_layers,
        num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_key_value_heads or lang.num_attention_heads,
        n_shared_experts=lang.n_shared_experts or 0,
        n_routed_experts=lang.n_routed_experts,
        num_experts_per_tok=lang.num_experts_per_tok,
        first_k_dense_replace=lang.first_k_dense_replace,
        routed_scaling_factor=lang.routed_scaling_factor,
        norm_topk_prob=lang.norm_topk_prob,
        hidden_act=lang.hidden_act,
        max_position_embeddings=lang.max_position_embeddings,
        rms_norm_eps=lang.rms_norm_eps,
        pad_token_id=lang.pad_token_id,
        bos_token_id=lang.bos_token_id,
        eos_token_id=lang.eos_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": lang.rope_theta},
        attention_bias=lang.attention_bias,
        attention_dropout=lang.attention_dropout,
    )
    if lang.use_mla:
        common.update(
            kv_lora_rank=lang.kv_lora_rank,
            q_lora_rank=lang.q_lora_rank,
            qk_rope_head_dim=lang.qk_rope_head_dim,
            qk_nope_head_dim=lang.qk_nope_head_dim,
            v_head_dim=lang.v_head_dim,
        )
    else:
        hd = lang.head_dim
        common.update(kv_lora_rank=0, q_lora_rank=None, qk_rope_head_dim=hd, qk_nope_head_dim=0, v_head_dim=hd)
    if lang.routing_family == "deepseek_v3":
        cfg: PreTrainedConfig = DeepseekV3Config(
            n_group=lang.n_group or 1, topk_group=lang.topk_group or 1, rope_interleave=True, **common
        )
    else:
        common.pop("norm_topk_prob")  # checked False above; transformers' V2 router never renormalises
        cfg = DeepseekV2Config(
            topk_method=lang.topk_method.value, n_group=lang.n_group, topk_group=lang.topk_group, **common
        )
    cfg.use_mla = lang.use_mla
    return cfg


def vision_config_from_official(vis: VisionConfig) -> SiglipVisionConfig:
    """transformers' SigLIP vision config for the official tower (tanh-approximated GELU, no pooling head)."""
    return SiglipVisionConfig(
        hidden_size=vis.width,
        intermediate_size=vis.intermediate_size,
        num_hidden_layers=vis.layers,
        num_attention_heads=vis.heads,
        num_channels=3,
        image_size=vis.image_size,
        patch_size=vis.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


class DeepseekVL2Config(PreTrainedConfig):
    """The configuration :class:`~model_adapters.deepseek_vl2.modeling.DeepseekVL2ForCausalLM` takes.

    Build it with :meth:`from_official`. ``text_config`` and ``vision_config`` are transformers configs;
    ``official`` is the parsed official config (the source of truth, written back by the saver).
    """

    model_type = MODEL_TYPE

    text_config: Any = None
    vision_config: Any = None
    official: Any = None

    @classmethod
    def from_official(cls, official: OfficialConfig | dict[str, Any]) -> DeepseekVL2Config:
        if isinstance(official, dict):
            official = parse_official_config(official)
        return cls(
            text_config=text_config_from_official(official.language),
            vision_config=vision_config_from_official(official.vision),
            official=official,
            tie_word_embeddings=False,
        )

    def to_official_dict(self) -> dict[str, Any]:
        return self.official.to_official_dict()
