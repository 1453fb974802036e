"""Writing the compressed checkpoint (:func:`save_quantized`; the layout is in :mod:`mcmoe_vl.quant.checkpoint`),
and the accounting of a quantized model's storage by category."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcmoe_vl.io import file_sha256, save_safetensors_atomic, write_bytes_atomic, write_json_atomic

from .accounting import Accounting, CategoryBits, build_accounting, resident_bytes
from .format import FORMAT, MANIFEST_FILE, TENSOR_FILE, CheckpointError
from .manifest import (ExpertItem, ExpertsModule, Manifest, QuantizedModule, TensorFile, TensorSpec, json_values,
                       quantization_config_dict)
from .model import QuantizeConfig, QuantReport
from .plan import BitPlan, check_plan_type
from .qlinear import QuantExpert, QuantExperts, QuantLinear

log = logging.getLogger(__name__)

# Files copied from the source model's directory so that the checkpoint is a complete Hugging Face model directory.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "preprocessor_config.json", "processor_config.json", "generation_config.json")


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# -- categories for accounting -----------------------------------------------------------------------------------
def _category_prefixes(model: nn.Module, adapter: Any) -> tuple[list[str], list[str]]:
    experts, attention = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantExperts):
            experts.append(name + ".")
    layers = adapter.decoder_layers(model)
    lpath = next((n for n, m in model.named_modules() if m is layers), "layers")
    for i, layer in enumerate(layers):
        mlp = getattr(layer, adapter.mlp_attr, None)
        ex = getattr(mlp, adapter.experts_attr, None) if mlp is not None else None
        if ex is not None:
            experts.append(f"{lpath}.{i}.{adapter.mlp_attr}.{adapter.experts_attr}.")
        if getattr(layer, adapter.attention_attr, None) is not None:
            attention.append(f"{lpath}.{i}.{adapter.attention_attr}.")
    return sorted(set(experts)), attention


def _categorize(name: str, experts: list[str], attention: list[str]) -> str:
    if any(name.startswith(p) for p in experts):
        return "experts"
    if any(name.startswith(p) for p in attention):
        return "attention"
    return "other"


def account_model(model: nn.Module, adapter: Any) -> dict[str, CategoryBits]:
    """Params, stored bytes and nominal bit-params per category, from the model's modules."""
    experts, attention = _category_prefixes(model, adapter)
    cats = {c: CategoryBits() for c in ("experts", "attention", "other")}
    quant_params: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            c = cats[_categorize(name + ".", experts, attention)]
            n = mod.in_features * mod.out_features
            c.params += n
            c.stored_bytes += mod.packed.nbytes
            c.nominal_bit_params += n * mod.meta.bits
            for t in mod.packed.tensors().values():
                quant_params.add(id(t))
    seen: set[int] = set()
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        if id(t) in quant_params or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        mod_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(mod_name) if mod_name else model, QuantLinear):
            continue  # e.g. a bias: counted with the linear's storage below
        c = cats[_categorize(name, experts, attention)]
        if t.is_floating_point() and (name.endswith("weight") or isinstance(t, nn.Parameter)):
            c.params += t.numel()
            c.nominal_bit_params += t.numel() * t.element_size() * 8
        c.stored_bytes += t.numel() * t.element_size()
    return cats


# -- where ----------------------------------------------------------------------------------------------------------
def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def model_source_dir(model: nn.Module) -> Path | None:
    """The local directory ``model`` was loaded from (``config._name_or_path``), if it is one."""
    src = getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(src) if src and Path(src).is_dir() else None


def check_output_dir(out_dir: str | os.PathLike[str], source_dir: str | os.PathLike[str] | None) -> None:
    """Refuse to write a checkpoint into the directory of the model it was made from (it would replace the
    model's own weights). Call it before any long work."""
    if source_dir is not None and _same_dir(Path(out_dir), Path(source_dir)):
        raise CheckpointError(f"the output directory {out_dir} is the source model's directory {source_dir}: "
                              "writing there would replace the model's own weights; choose another output directory")


def _copy_side_files(source_dir: Path | None, out: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES if source_dir is not None else ():
        src = source_dir / name
        if src.is_file():
            write_bytes_atomic(out / name, src.read_bytes())
            copied.append(name)
    return copied


# -- what is written ------------------------------------------------------------------------------------------------
def _hf_config(model: nn.Module, manifest: Manifest) -> dict:
    """config.json: the model's config in its checkpoint layout (a port whose checkpoints keep an upstream layout,
    such as DeepSeek-VL2's, says so with ``to_official_dict``) plus the ``quantization_config``."""
    official = getattr(model.config, "to_official_dict", None)
    cfg = json_values(official()) if official else dict(manifest.config or {})
    if not official:
        cfg["architectures"] = [manifest.architecture]
    cfg["quantization_config"] = quantization_config_dict(manifest)
    return cfg


def _stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state, each storage once; tied weights become aliases (name -> stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple[int, int, tuple], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in by_ptr and t.numel():
            aliases[name] = by_ptr[key]  # tied weights are stored once
            continue
        by_ptr[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def _quant_modules(model: nn.Module) -> tuple[dict[str, QuantizedModule], dict[str, ExpertsModule]]:
    quantized: dict[str, QuantizedModule] = {}
    experts: dict[str, ExpertsModule] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            quantized[name] = QuantizedModule(**mod.meta.to_json(), perm=mod.perm is not None,
                                              bias=mod.bias is not None, dtype=dtype_name(mod.dtype))
        elif isinstance(mod, QuantExperts):
            items = [ExpertItem(kind="quant", bits=e.down.meta.bits) if isinstance(e, QuantExpert)
                     else ExpertItem(kind="dense", bits=16) for e in mod.experts]
            experts[name] = ExpertsModule(layout="fused", experts=items)
    return quantized, experts


def _hf_config_dict(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg_dict = json_values(cfg.to_dict())
    cfg_dict.pop("quantization_config", None)
    return cfg_dict


# -- save -----------------------------------------------------------------------------------------------------------
def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    plan: BitPlan,
    report: QuantReport | None = None,
    config: QuantizeConfig | None = None,
    adapter: Any | None = None,
    source_dir: str | os.PathLike[str] | None = None,
) -> Accounting:
    """Write ``model`` (quantized by :func:`mcmoe_vl.quant.model.quantize_model`) to ``out_dir`` as a Hugging Face
    model directory (see :mod:`mcmoe_vl.quant.checkpoint`).

    ``source_dir``: the directory the model was loaded from (default: ``model.config._name_or_path`` when it is a
    local directory); its tokenizer, processor and generation files are copied, and ``out_dir`` may not be it.
    ``adapter``: the model family's (``model_adapters.get_adapter(model)``): it names the experts and attention
    modules for the accounting.
    """
    check_plan_type(plan)
    if adapter is None:
        raise TypeError("save_quantized needs the model family's adapter: pass adapter=model_adapters.get_adapter(model)")
    source = Path(source_dir) if source_dir is not None else model_source_dir(model)
    out = Path(out_dir)
    check_output_dir(out, source)
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _stored_tensors(model)
    quantized, experts = _quant_modules(model)
    path = out / TENSOR_FILE
    save_safetensors_atomic(path, tensors, metadata={"format": FORMAT})
    size = os.stat(path).st_size
    acc = build_accounting(account_model(model, adapter), bytes_on_disk=size, resident_bytes=resident_bytes(model))
    cfg = getattr(model, "config", None)
    manifest = Manifest(
        model_type=getattr(cfg, "model_type", None), architecture=type(model).__name__,
        adapter=getattr(adapter, "name", None), config=_hf_config_dict(model),
        dtype=dtype_name(next(model.parameters()).dtype),
        attn_implementation=getattr(cfg, "_attn_implementation", None), plan=plan,
        quantize_config=config or QuantizeConfig(), report=report, quantized=quantized, experts=experts,
        tensors={k: TensorSpec(dtype=dtype_name(v.dtype), shape=list(v.shape)) for k, v in tensors.items()},
        aliases=aliases, file=TensorFile(name=TENSOR_FILE, bytes=size, sha256=file_sha256(path)), accounting=acc,
    ).seal()
    _copy_side_files(source, out)
    if cfg is not None:
        write_json_atomic(out / "config.json", _hf_config(model, manifest))
    write_json_atomic(out / MANIFEST_FILE, manifest.to_json())
    log.info("saved quantized model to %s: %s", out, acc.summary())
    return acc
