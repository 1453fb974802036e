"""DeepSeek-VL2 (``model_type: deepseek_vl_v2``): a port on transformers 5, its processor, generation and adapter.

- :mod:`.configuration`: the official ``config.json`` parsed and checked (its sections in :mod:`.config_sections`);
  transformers configs from it.
- :mod:`.modeling`: :class:`DeepseekVL2ForCausalLM`; its language model in :mod:`.language_model`.
- :mod:`.loading`: :func:`model_from_config`, :func:`load_official`, :func:`save_official`.
- :mod:`.processing`: :class:`~.processing.DeepseekVL2Processor`; :mod:`.generation`: greedy generation.
- :mod:`.adapter`: the expert-interface adapter (registered as ``deepseek_vl_v2``) and calibration batches.
- :mod:`.tiny`: an offline tokenizer and a tiny config (tests, small experiments).

The lmms-eval model lives in :mod:`.lmms_model` (imported on demand: it needs lmms-eval).
"""

from .adapter import DeepseekVL2Adapter, image_text_batches
from .configuration import DeepseekVL2Config, OfficialConfig, parse_official_config
from .loading import load_official, model_from_config, save_official
from .modeling import DeepseekVL2ForCausalLM

__all__ = [
    "DeepseekVL2Adapter",
    "image_text_batches",
    "DeepseekVL2Config",
    "DeepseekVL2ForCausalLM",
    "OfficialConfig",
    "load_official",
    "model_from_config",
    "parse_official_config",
    "save_official",
]
