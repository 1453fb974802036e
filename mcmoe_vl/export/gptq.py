"""GPTQ export (``checkpoint_format: "gptq"``, the layout of AutoGPTQ / GPTQModel, read by vLLM's ``gptq`` and
``gptq_marlin`` and by transformers through GPTQModel).

Per linear with K inputs, N outputs, width b and groups of g inputs:

- ``qweight`` int32 (K * b / 32, N): the codes of each output column as one little-endian bit stream along the
  inputs (input k at bits [k b, k b + b)), 32 inputs in b words; for b = 3 this is GPTQ's three-word layout;
- ``qzeros`` int32 (K / g, N * b / 32): ``zero - 1`` (GPTQ's stored offset; its kernels add the 1 back) packed the
  same way along the outputs; a zero of 0 cannot be stored and is refused;
- ``scales`` float16 (K / g, N) (our scales are float16 already, so they are exact), ``g_idx`` int32 (K,) = k // g.

Dequantised weight: ``scales * (code - zero)``. GPTQ has one ``bits`` and one ``group_size`` per model; other
widths go into GPTQModel's ``dynamic`` overrides (``"+:^name$": {"bits": b}``) and 16-bit linears into its skips
(``"-:^name$": {}``). Widths 2, 3, 4 and 8 only; 1-bit experts are written as 2-bit codes {0, 2} with zero 1.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mcmoe_vl.io import save_safetensors_atomic, write_json_atomic

from .modules import ExportError, IntLinear, dense_tensors, load_for_export, model_linears

log = logging.getLogger(__name__)

GPTQ_BITS = (2, 3, 4, 8)


def pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) non-negative codes < 2^bits -> (K * bits / 32, N) int32: each column a little-endian bit stream,
    code k at bits [k * bits, (k + 1) * bits). K must be a multiple of 32."""
    k, n = codes.shape
    if k % 32:
        raise ExportError(f"GPTQ packing needs a multiple of 32 values along the packed axis, got {k}")
    c = codes.to(torch.int64).reshape(k // 32, 32, n)
    words = torch.zeros(k // 32, bits, n, dtype=torch.int64)
    for j in range(32):  # value j of each block of 32 starts at bit j * bits of the block's stream
        w, off = divmod(j * bits, 32)
        words[:, w] |= (c[:, j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # straddles into the next word
            words[:, w + 1] |= c[:, j] >> (32 - off)
    words = words.reshape(k // 32 * bits, n)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def module_tensors(lin: IntLinear) -> dict[str, torch.Tensor]:
    """GPTQ's tensors of one linear."""
    if lin.bits not in GPTQ_BITS:
        raise ExportError(f"{lin.name}: {lin.bits}-bit codes have no GPTQ form (GPTQ widths: {list(GPTQ_BITS)})")
    n, k = lin.codes.shape
    if n % 32 or k % 32:
        raise ExportError(f"{lin.name}: {n} outputs x {k} inputs; GPTQ packs codes 32 at a time along the inputs "
                          "and zero points along the outputs, so both must be multiples of 32; use --format "
                          "compressed-tensors")
    zero = lin.zero.round().to(torch.int64)  # (N, G)
    if bool((zero < 1).any()):
        raise ExportError(f"{lin.name}: a group has zero point 0, which GPTQ's format (it stores zero - 1) cannot "
                          "hold; use --format compressed-tensors")
    out = {
        f"{lin.name}.qweight": pack_bitstream(lin.codes.t().contiguous(), lin.bits),
        f"{lin.name}.qzeros": pack_bitstream(zero - 1, lin.bits).t().contiguous(),  # (N, G) packed along N
        f"{lin.name}.scales": lin.scale.t().contiguous().to(torch.float16),
        f"{lin.name}.g_idx": (torch.arange(k) // lin.group_size).to(torch.int32),
    }
    if not torch.equal(out[f"{lin.name}.scales"].float(), lin.scale.t()):
        raise ExportError(f"{lin.name}: scales are not exactly representable in float16")
    if lin.bias is not None:
        out[f"{lin.name}.bias"] = lin.bias.to(torch.float16)
    return out


def gptq_config(widths: dict[str, int], dense: list[str], group_size: int) -> dict[str, Any]:
    """``quantization_config``: the most common width as ``bits``, the others and the skips in ``dynamic``."""
    bits = Counter(widths.values()).most_common(1)[0][0]
    dynamic: dict[str, dict] = {f"+:^{re.escape(n)}$": {"bits": b} for n, b in sorted(widths.items()) if b != bits}
    dynamic.update({f"-:^{re.escape(n)}$": {} for n in sorted(dense)})
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group_size,
            "desc_act": False, "sym": False, "static_groups": False, "true_sequential": True, "dynamic": dynamic}


def export_gptq(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``out_dir`` in GPTQ format from the checkpoint in ``ckpt_dir``; returns a summary (see
    :func:`mcmoe_vl.export.compressed_tensors.export_compressed_tensors`)."""
    from .directory import check_export_dir, copy_side_files, source_config

    check_export_dir(ckpt_dir, out_dir)
    model, adapter = load_for_export(ckpt_dir)
    tensors: dict[str, torch.Tensor] = {}
    widths: dict[str, int] = {}
    groups, widened, dense = set(), [], []
    for item in model_linears(model, adapter):
        if isinstance(item, IntLinear):
            tensors.update(module_tensors(item))
            widths[item.name] = item.bits
            groups.add(item.group_size)
            if item.source_bits != item.bits:
                widened.append(item.name)
        else:
            tensors[item[0]] = item[1].contiguous()
            dense.append(item[0].removesuffix(".weight"))
    if len(groups) > 1:
        raise ExportError(f"GPTQ has one group size per model; this checkpoint uses {sorted(groups)}")
    tensors.update(dense_tensors(model, adapter))
    out = Path(out_dir)
    save_safetensors_atomic(out / "model.safetensors", tensors, metadata={"format": "pt"})
    cfg = source_config(ckpt_dir)
    cfg["quantization_config"] = gptq_config(widths, dense, groups.pop())
    write_json_atomic(out / "config.json", cfg)
    copy_side_files(ckpt_dir, out)
    per_width = Counter(widths.values())
    return {"modules": {f"{b}-bit": per_width[b] for b in sorted(per_width)}, "one_bit_as_two": widened}
