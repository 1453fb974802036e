"""Calibration token batches from a text file, a token-ids file, or the embedded corpus.

The paper calibrates on 128 random windows of 2048 tokens from C4; :func:`token_windows` draws such windows
(seeded) from one long token stream. Token-ids files are JSON (a list of lists of ints, or ``{"input_ids": ...}``)
or safetensors with an ``input_ids`` tensor (N, S).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def token_windows(ids: Sequence[int] | torch.Tensor, seq_len: int, num: int, *, seed: int = 0) -> torch.Tensor:
    """``num`` windows of ``seq_len`` tokens at seeded random offsets of one token stream: (num, seq_len) int64.

    A stream shorter than ``seq_len`` is an error; when it holds fewer than ``num`` disjoint windows, windows
    overlap (random offsets), which is what the paper's sampling does as well.
    """
    t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if seq_len < 1 or num < 1:
        raise ValueError(f"seq_len and num must be >= 1, got {seq_len}, {num}")
    if t.numel() < seq_len:
        raise ValueError(f"the calibration data has {t.numel()} tokens, fewer than one window of {seq_len}; "
                         f"give more data or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, t.numel() - seq_len + 1, (num,), generator=g)
    return torch.stack([t[s : s + seq_len] for s in starts.tolist()])


def load_token_ids(path: str | os.PathLike[str]) -> torch.Tensor:
    """Token ids (N, S) int64 from a JSON or safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"token-ids file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(p))
        if "input_ids" not in data:
            raise ValueError(f"{p}: no 'input_ids' tensor (has {sorted(data)})")
        ids = data["input_ids"]
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{p}: input_ids has dtype {ids.dtype}; valid: an integer dtype (int64, int32)")
    else:
        raw: Any = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(raw, dict):
            raw = raw.get("input_ids")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{p}: expected a non-empty list of token-id lists (or {{'input_ids': ...}})")
        if isinstance(raw[0], int):
            raw = [raw]
        _check_json_ids(raw, p)
        lens = {len(r) for r in raw}
        if len(lens) != 1:
            raise ValueError(f"{p}: sequences have different lengths {sorted(lens)}; pad or cut them to one length")
        ids = torch.tensor(raw, dtype=torch.int64)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"{p}: input_ids must be (N, S), got shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    check_token_ids(ids, None, where=str(p))
    return ids


def _check_json_ids(rows: list[Any], p: Path) -> None:
    for r, row in enumerate(rows):
        if not isinstance(row, list):
            raise ValueError(f"{p}: sequence {r} is {type(row).__name__}, not a list of token ids")
        for c, v in enumerate(row):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{p}: token id at sequence {r}, position {c} is {v!r}; valid: integers "
                                 f"0 <= id < vocabulary size")


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, *, where: str) -> None:
    """Token ids must be integers in ``[0, vocab_size)``; the error names the source, the id and its position."""
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{where}: token ids have dtype {ids.dtype}; valid: integers")
    bad = ids < 0
    if vocab_size is not None:
        bad |= ids >= vocab_size
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        valid = f"0 <= id < {vocab_size} (the model's vocabulary)" if vocab_size is not None else "ids >= 0"
        raise ValueError(f"{where}: token id {int(ids[pos])} at (sequence, position) {pos} is out of range; "
                         f"valid: {valid}")


def batches_from_ids(ids: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split (N, S) token ids into model-input batches with an all-ones attention mask."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
            for i in range(0, ids.shape[0], batch_size)]
