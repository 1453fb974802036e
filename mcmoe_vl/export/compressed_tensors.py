"""compressed-tensors ``pack-quantized`` export: what vLLM (and transformers with compressed-tensors installed) reads.

Each quantized linear ``m`` is written as ``m.weight_packed`` (int32, codes packed densely by compressed-tensors'
own ``pack_to_int32``), ``m.weight_scale`` (float32, (R, G)), ``m.weight_zero_point`` (packed the same way) and
``m.weight_shape``; one ``config_groups`` entry per width lists its modules by exact-name regex. compressed-tensors
stores signed codes: ``q = code - 2^(b-1)``, ``zp = zero - 2^(b-1)``, so ``(q - zp) * scale`` equals this project's
``scale * (code - zero)`` in float32, bit for bit (scales are written in float32 for that reason; 16-bit scales
would round the product differently). 1-bit experts are exported as 2-bit codes {0, 2} with zero 1.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mcmoe_vl.io import save_safetensors_atomic, write_json_atomic

from .modules import ExportError, IntLinear, dense_tensors, load_for_export, model_linears

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"


def _ct() -> Any:
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as exc:
        raise ExportError(f"--format compressed-tensors needs the compressed-tensors package ({exc}); "
                          "pip install compressed-tensors") from None
    import types

    return types.SimpleNamespace(pack=pack_to_int32, Args=QuantizationArgs, Config=QuantizationConfig,
                                 Scheme=QuantizationScheme)


def module_tensors(lin: IntLinear, ct: Any) -> dict[str, torch.Tensor]:
    """compressed-tensors' tensors of one linear."""
    rows, cols = lin.codes.shape
    if cols % lin.group_size:
        raise ExportError(f"{lin.name}: {cols} columns are not a multiple of the group size {lin.group_size}, "
                          "which compressed-tensors' group strategy requires")
    off = 1 << (lin.bits - 1)
    out = {
        f"{lin.name}.weight_packed": ct.pack((lin.codes - off).to(torch.int8), lin.bits),
        f"{lin.name}.weight_scale": lin.scale.contiguous(),
        f"{lin.name}.weight_zero_point": ct.pack((lin.zero.round().to(torch.int16) - off).to(torch.int8), lin.bits,
                                                 packed_dim=0).contiguous(),
        f"{lin.name}.weight_shape": torch.tensor([rows, cols]),
    }
    if lin.bias is not None:
        out[f"{lin.name}.bias"] = lin.bias.contiguous()
    return out


def quantization_config(groups: dict[tuple[int, int], list[str]], ignore: list[str], ct: Any) -> dict:
    """compressed-tensors' config: one group per (width, group size), modules named by exact regex."""
    schemes = {}
    for i, ((bits, gs), names) in enumerate(sorted(groups.items())):
        schemes[f"group_{i}"] = ct.Scheme(
            targets=[f"re:^{re.escape(n)}$" for n in sorted(names)],
            weights=ct.Args(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=gs))
    cfg = ct.Config(config_groups=schemes, format=FORMAT, quantization_status="compressed", ignore=ignore)
    return cfg.model_dump(mode="json", exclude_none=True)


def export_compressed_tensors(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``out_dir`` (model.safetensors + config.json + tokenizer files) from the checkpoint in ``ckpt_dir``.

    Returns a summary: modules per width and the 1-bit modules written as 2-bit codes."""
    from mcmoe_vl.export.directory import check_export_dir, copy_side_files, source_config

    ct = _ct()
    check_export_dir(ckpt_dir, out_dir)
    model, adapter = load_for_export(ckpt_dir)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    widened, dense_linears = [], []
    for item in model_linears(model, adapter):
        if isinstance(item, IntLinear):
            tensors.update(module_tensors(item, ct))
            groups[(item.bits, item.group_size)].append(item.name)
            if item.source_bits != item.bits:
                widened.append(item.name)
        else:
            tensors[item[0]] = item[1].contiguous()
            dense_linears.append(item[0].removesuffix(".weight"))
    tensors.update(dense_tensors(model, adapter))
    out = Path(out_dir)
    save_safetensors_atomic(out / "model.safetensors", tensors, metadata={"format": "pt"})
    cfg = source_config(ckpt_dir)
    cfg["quantization_config"] = quantization_config(groups, ignore=sorted(dense_linears), ct=ct)
    write_json_atomic(out / "config.json", cfg)
    copy_side_files(ckpt_dir, out)
    summary = {"modules": {f"{b}-bit": len(v) for (b, _), v in sorted(groups.items())}, "one_bit_as_two": widened}
    log.info("exported %s to %s (compressed-tensors %s): %s", ckpt_dir, out, FORMAT, summary["modules"])
    return summary
