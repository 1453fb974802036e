"""The parts of an exported directory that every format shares: where it may go, its config, its side files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mcmoe_vl.io import write_bytes_atomic
from mcmoe_vl.quant.checkpoint import SIDE_FILES, check_output_dir

from .modules import ExportError


def check_export_dir(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Refuse to export into the checkpoint's own directory (naming both)."""
    if not (Path(ckpt_dir) / "config.json").is_file():
        raise ExportError(f"{ckpt_dir} is not a checkpoint directory (no config.json)")
    check_output_dir(out_dir, ckpt_dir)


def source_config(ckpt_dir: str | os.PathLike[str]) -> dict:
    """The checkpoint's config.json without our quantization_config (the export writes its own)."""
    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text(encoding="utf-8"))
    cfg.pop("quantization_config", None)
    return cfg


def copy_side_files(ckpt_dir: str | os.PathLike[str], out: Path) -> None:
    for name in SIDE_FILES:
        src = Path(ckpt_dir) / name
        if src.is_file():
            write_bytes_atomic(out / name, src.read_bytes())
