"""The model's context limit, read from its config.json before any weights are loaded."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_SECTIONS = ("text_config", "language_config")  # where VLM configs keep the language model's settings


def max_positions(model_dir: str | os.PathLike[str]) -> int | None:
    """``max_position_embeddings`` of the (language) model in ``model_dir/config.json``, or None if not stated."""
    cfg_file = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the loader reports a missing or broken config with its own message
    for section in (cfg, *(cfg.get(s) for s in _SECTIONS)):
        if isinstance(section, dict) and isinstance(section.get("max_position_embeddings"), int):
            return section["max_position_embeddings"]
    return None


def clamp_seq_len(model_dir: str | os.PathLike[str], seq_len: int) -> int:
    """``seq_len``, or the model's maximum with a warning when ``seq_len`` exceeds it."""
    limit = max_positions(model_dir)
    if limit is not None and seq_len > limit:
        log.warning("--seq-len %d exceeds the model's maximum of %d positions (max_position_embeddings in %s); "
                    "using %d", seq_len, limit, Path(model_dir) / "config.json", limit)
        return limit
    return seq_len


def check_ids_file(data: str, model_dir: str | os.PathLike[str]) -> None:
    """A token-ids file (.json / .safetensors) with sequences longer than the model's maximum is an error naming
    the file, the length and the limit (token ids are used as they are, so they cannot be clamped silently)."""
    p = Path(data)
    if p.suffix not in (".json", ".safetensors") or not p.is_file():
        return
    limit = max_positions(model_dir)
    if limit is None:
        return
    from .data import load_token_ids

    length = int(load_token_ids(p).shape[1])
    if length > limit:
        raise ValueError(f"{p}: sequences of {length} tokens exceed the model's maximum of {limit} positions "
                         f"(max_position_embeddings in {Path(model_dir) / 'config.json'}); cut them to at most "
                         f"{limit} tokens")
