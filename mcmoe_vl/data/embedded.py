"""Loaders of the two tiny trained models committed under ``embedded/`` (offline, no Hub).

- ``embedded/mixtral-tiny``: transformers ``MixtralForCausalLM`` (8 experts, top-2) trained on standard-library
  docstrings, with its byte-level tokenizer (``AutoTokenizer`` works on the directory).
- ``embedded/deepseek-vl2-tiny``: a DeepSeek-VL2 checkpoint in the official layout (8 routed experts top-4, one
  shared expert, first layer dense) trained on offline image questions, with its tokenizer.

Weights are stored in float16 (to keep the repository small) and loaded in ``dtype`` (float32 by default).

Example::

    model, tok = load_embedded_mixtral()
    vlm, processor = load_embedded_vlm()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .tasks import REPO_ROOT

EMBEDDED_DIR = REPO_ROOT / "embedded"
MIXTRAL_TINY_DIR = EMBEDDED_DIR / "mixtral-tiny"
VLM_TINY_DIR = EMBEDDED_DIR / "deepseek-vl2-tiny"


def _check(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"embedded model not found at {path} (it ships in the repository; retrain with "
                                "the scripts in training/)")
    return path


def load_embedded_mixtral(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          path: str | Path | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of the embedded Mixtral-architecture language model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = _check(Path(path) if path else MIXTRAL_TINY_DIR)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(p))


def load_embedded_vlm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      path: str | Path | None = None) -> tuple[Any, Any]:
    """(model in eval mode, its processor) of the embedded vision-language model (DeepSeek-VL2 architecture), both
    from the adapter of the directory's ``model_type``."""
    from transformers import AutoTokenizer

    from model_adapters import adapter_of_directory

    p = _check(Path(path) if path else VLM_TINY_DIR)
    adapter = adapter_of_directory(p)
    model = adapter.load_model(p, dtype=dtype, device=device).eval()
    return model, adapter.load_processor(AutoTokenizer.from_pretrained(str(p)), model)
