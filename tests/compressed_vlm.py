"""Compressed checkpoints of the two vision-language families, written as the pipeline writes them: a mixed-width
plan (1-, 2-, 3-, 4-bit and one 16-bit expert per layer), GPTQ on image+text calibration batches from the adapter,
``save_quantized`` with the family's tokenizer, and ODP pruning settings saved next to the weights.

- ``deepseek_vl_v2``: the embedded trained DeepSeek-VL2-architecture model (bfloat16; its tokenizer is copied from
  its directory by ``save_quantized``);
- ``qwen3_vl_moe``: the tiny random Qwen3-VL-MoE of :mod:`tiny_models` (float32) and its offline tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tiny_models import tiny_qwen3_vl_moe, tiny_qwen3_vl_tokenizer

from mcmoe_vl.calibration.image_text import ImageTextSample
from mcmoe_vl.quant.checkpoint import PRUNING_FILE, save_quantized
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.plan import BitPlan
from model_adapters import get_adapter

VLM_FAMILIES = ("deepseek_vl_v2", "qwen3_vl_moe")
WIDTHS = (2, 3, 1, 4, 16, 2, 3, 1)


def image_samples(n: int = 4) -> list[ImageTextSample]:
    rng = np.random.default_rng(0)
    questions = ["What colour is the square?", "Count the dots in the picture.", "Which shape is it?", "Left?"]
    return [ImageTextSample(questions[i % 4], [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))],
                            answer="red" if i % 2 else None) for i in range(n)]


def _model(family: str) -> tuple[Any, Any]:
    if family == "qwen3_vl_moe":
        model, tok = tiny_qwen3_vl_moe(), tiny_qwen3_vl_tokenizer()
        return model, get_adapter(model).load_processor(tok, model)
    from mcmoe_vl.data.embedded import load_embedded_vlm

    return load_embedded_vlm(dtype=torch.bfloat16)


def compressed_vlm(family: str, out: Path, *, prune_rate: float = 0.3) -> tuple[Any, Any, Any, list[dict]]:
    """Write the compressed checkpoint of ``family`` to ``out``; returns (adapter, the quantized model in memory,
    its processor, the calibration batches)."""
    from mcmoe_vl.pruning.artifact import PruningMethod, save_pruning
    from mcmoe_vl.pruning.odp import ODPConfig
    from mcmoe_vl.pruning.workflow import fit_pruning

    model, processor = _model(family)
    adapter = get_adapter(model)
    batches = adapter.calibration_batches(processor, image_samples(), batch_size=2)
    layers = {la.index: la.num_experts for la in adapter.moe_layers(model)}
    plan = BitPlan.from_experts({i: [WIDTHS[e % len(WIDTHS)] for e in range(n)] for i, n in layers.items()},
                                model_type=family, group_size=8)
    report = quantize_model(model, plan, batches, QuantizeConfig(progress=False, min_tokens=0), adapter=adapter)
    save_quantized(model, out, plan=plan, report=report, adapter=adapter)
    if not (out / "tokenizer_config.json").is_file():
        processor.tokenizer.save_pretrained(str(out))
    art = fit_pruning(model, batches, PruningMethod.ODP, odp=ODPConfig(prune_rate=prune_rate), progress=False)
    save_pruning(art, out / PRUNING_FILE)
    return adapter, model.eval(), processor, batches
