"""The compressed checkpoint: ``model.safetensors`` plus a JSON manifest, written atomically; and its loader.

Layout of a checkpoint directory::

    model.safetensors      every tensor of the quantized model's state: packed linears as
                           <module>.qdata / .scale / .zero / .perm, everything else in its 16-bit dtype
    config.json            the Hugging Face config with a ``quantization_config`` ({"quant_method": "mcmoe_vl",
                           ...}): with ``import mcmoe_vl``, transformers' ``from_pretrained`` loads the directory
                           (:mod:`mcmoe_vl.hf`)
    tokenizer / processor files, generation_config.json
                           copied from the source model's directory when it has them
    quant_manifest.json    {"format": "mcmoe_vl.quantized", "format_version": 2, "model_type", "architecture",
                            "adapter", "config" (the HF config dict), "dtype", "plan", "quantize_config",
                            "report", "quantized": {module: {bits, shape, group_size, perm, bias}},
                            "experts": {experts module: {"layout": "fused", "experts": [{"kind": "quant"|"dense",
                            "bits": ...}]}}, "tensors": {name: {dtype, shape}}, "aliases": {name: stored name},
                            "file": {name, bytes, sha256}, "accounting": {...},
                            "integrity": {"algorithm": "sha256", "digest"}}

The manifest is written after the tensors, so a directory with a manifest has a complete tensor file. Loading
(:func:`load_quantized`) builds the model without allocating its dense weights (parameters on the meta device),
replaces the quantized modules, assigns every tensor and refuses, with a message naming the tensor: a missing or
unexpected tensor, a shape or dtype that differs from the manifest or the model, a file whose size or hash differs
from the manifest (truncated or edited), and any parameter left uninitialised.

The manifest's ``integrity`` digest is a SHA-256 over its own canonical JSON (every other key, the tensor file's
SHA-256 included), so an edited manifest (bits, plan, accounting, the model config inside it) is refused rather than
loaded. It guards against accidents and hand edits, not against someone who recomputes it: like safetensors'
header checks, it is integrity, not authenticity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mcmoe_vl.io import _json_default, read_json, save_safetensors_atomic, write_bytes_atomic, write_json_atomic

from .accounting import Accounting, CategoryBits, build_accounting, resident_bytes
from .format import (FORMAT, FORMAT_VERSION, MANIFEST_FILE, PRUNING_FILE, QUANT_METHOD, TENSOR_FILE,  # noqa: F401
                     CheckpointError)
from .model import QuantizeConfig, QuantReport
from .packed import PackedMeta, PackedTensor
from .plan import QuantPlan, as_quant_plan
from .qlinear import DenseExpert, Kernel, QuantExpert, QuantExperts, QuantLinear, Runtime

log = logging.getLogger(__name__)

# Files copied from the source model's directory so that the checkpoint is a complete Hugging Face model directory.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "preprocessor_config.json", "processor_config.json", "generation_config.json")
REQUIRED_KEYS = ("format", "format_version", "model_type", "architecture", "config", "dtype", "plan", "quantized",
                 "experts", "tensors", "aliases", "file", "accounting", "integrity")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dt: torch.dtype) -> str:
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


# -- save -----------------------------------------------------------------------------------------------------------
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


def manifest_digest(manifest: dict) -> str:
    """SHA-256 over the manifest's canonical JSON, without its ``integrity`` entry."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` (as plain JSON values) with its ``integrity`` digest (re)computed."""
    manifest = json.loads(json.dumps(manifest, default=_json_default))  # the digest is of what lands on disk
    return {**manifest, "integrity": {"algorithm": "sha256", "digest": manifest_digest(manifest)}}


def quantization_config_dict(manifest: dict) -> dict:
    """The ``quantization_config`` entry of config.json: what transformers needs to pick our loader."""
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "format_version": FORMAT_VERSION,
            "manifest": MANIFEST_FILE, "dtype": manifest["dtype"], "pruning_file": PRUNING_FILE,
            "apply_pruning": True, "attn_implementation": manifest.get("attn_implementation")}


def _copy_side_files(source_dir: Path | None, out: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES if source_dir is not None else ():
        src = source_dir / name
        if src.is_file():
            write_bytes_atomic(out / name, src.read_bytes())
            copied.append(name)
    return copied


def _hf_config(model: nn.Module, manifest: dict) -> dict:
    """config.json: the model's config in its checkpoint layout (a port whose checkpoints keep an upstream layout,
    such as DeepSeek-VL2's, says so with ``to_official_dict``) plus the ``quantization_config``."""
    official = getattr(model.config, "to_official_dict", None)
    cfg = json.loads(json.dumps(official(), default=_json_default)) if official else dict(manifest["config"] or {})
    if not official:
        cfg["architectures"] = [manifest["architecture"]]
    cfg["quantization_config"] = quantization_config_dict(manifest)
    return cfg


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    plan: QuantPlan,
    report: QuantReport | None = None,
    config: QuantizeConfig | None = None,
    adapter: Any | None = None,
    source_dir: str | os.PathLike[str] | None = None,
) -> Accounting:
    """Write ``model`` (quantized by :func:`mcmoe_vl.quant.model.quantize_model`) to ``out_dir`` as a Hugging Face
    model directory (see the module docstring).

    ``source_dir``: the directory the model was loaded from (default: ``model.config._name_or_path`` when it is a
    local directory); its tokenizer, processor and generation files are copied, and ``out_dir`` may not be it.
    """
    plan = as_quant_plan(plan)
    if adapter is None:
        from model_adapters import get_adapter

        adapter = get_adapter(model)
    source = Path(source_dir) if source_dir is not None else model_source_dir(model)
    out = Path(out_dir)
    check_output_dir(out, source)
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _stored_tensors(model)
    quantized, experts = _quant_modules(model)
    path = out / TENSOR_FILE
    save_safetensors_atomic(path, tensors, metadata={"format": FORMAT})
    cats = account_model(model, adapter)
    acc = build_accounting(cats, bytes_on_disk=os.stat(path).st_size, resident_bytes=resident_bytes(model))
    cfg = getattr(model, "config", None)
    cfg_dict = cfg.to_dict() if cfg is not None else None
    if cfg_dict is not None:
        cfg_dict.pop("quantization_config", None)
    manifest = seal_manifest({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": getattr(cfg, "model_type", None),
        "architecture": type(model).__name__,
        "adapter": getattr(adapter, "name", None),
        "config": cfg_dict,
        "dtype": _dtype_name(next(model.parameters()).dtype),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "plan": plan.model_dump(mode="json"),
        "quantize_config": (config or QuantizeConfig()).model_dump(mode="json"),
        "report": report.model_dump(mode="json") if report is not None else None,
        "quantized": quantized,
        "experts": experts,
        "tensors": {k: {"dtype": _dtype_name(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()},
        "aliases": aliases,
        "file": {"name": TENSOR_FILE, "bytes": os.stat(path).st_size, "sha256": _sha256(path)},
        "accounting": acc.model_dump(mode="json"),
    })
    _copy_side_files(source, out)
    if cfg_dict is not None:
        write_json_atomic(out / "config.json", _hf_config(model, manifest))
    write_json_atomic(out / MANIFEST_FILE, manifest)
    log.info("saved quantized model to %s: %s", out, acc.summary())
    return acc


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


def _quant_modules(model: nn.Module) -> tuple[dict[str, dict], dict[str, dict]]:
    quantized: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            quantized[name] = {**mod.meta.to_json(), "perm": mod.perm is not None, "bias": mod.bias is not None,
                               "dtype": _dtype_name(mod.dtype)}
        elif isinstance(mod, QuantExperts):
            items = [{"kind": "quant", "bits": e.down.meta.bits} if isinstance(e, QuantExpert)
                     else {"kind": "dense", "bits": 16} for e in mod.experts]
            experts[name] = {"layout": "fused", "experts": items}
    return quantized, experts


# -- load -----------------------------------------------------------------------------------------------------------
def read_manifest(ckpt_dir: str | os.PathLike[str]) -> dict:
    """The checkpoint's manifest, checked: format, version, required keys and its integrity digest."""
    path = Path(ckpt_dir) / MANIFEST_FILE
    m = read_json(path, what="quantized-checkpoint manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {m.get('format_version')} is not supported (this loader "
                              f"reads {FORMAT_VERSION}); re-run the quantization to rewrite the checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise CheckpointError(f"{path}: the manifest lacks {missing} (required keys: {list(REQUIRED_KEYS)}); it "
                              "was edited or truncated: re-run the quantization")
    file = m["file"]
    if not isinstance(file, dict) or not {"name", "bytes", "sha256"} <= set(file):
        raise CheckpointError(f"{path}: \"file\" must name the tensor file with its bytes and sha256, got {file!r}")
    integ = m["integrity"]
    if not isinstance(integ, dict) or integ.get("digest") != manifest_digest(m):
        raise CheckpointError(f"{path} was edited after it was written (its integrity digest does not match its "
                              "content: bits, plan, accounting or model config changed); re-run the quantization "
                              "rather than editing the manifest")
    return m


def _empty_model(manifest: dict) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    cfg_dict = dict(manifest["config"] or {})
    model_type = cfg_dict.pop("model_type", manifest.get("model_type"))
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
    except ValueError as exc:
        raise CheckpointError(f"cannot rebuild a {model_type!r} config ({exc}); pass the model skeleton as "
                              "load_quantized(..., model=...)") from exc
    cls = getattr(transformers, manifest["architecture"], None)
    if cls is None:
        raise CheckpointError(f"transformers has no class {manifest['architecture']!r}; pass the model skeleton "
                              "as load_quantized(..., model=...)")
    dtype = getattr(torch, manifest["dtype"])
    with init_empty_weights(include_buffers=False):
        kw = {"attn_implementation": manifest["attn_implementation"]} if manifest.get("attn_implementation") else {}
        model = cls._from_config(config, dtype=dtype, **kw)
    return model.eval()


def load_quantized(
    ckpt_dir: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    runtime: Runtime = Runtime.PACKED,
    kernel: Kernel = Kernel.AUTO,
    verify_hash: bool = True,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`.

    ``model``: an (unquantized) instance of the architecture to load into, e.g. built under
    ``accelerate.init_empty_weights()``; by default the transformers class named in the manifest is built that
    way. ``runtime``: packed or fake-quant; ``kernel``: how the packed runtime multiplies (see :class:`Kernel`).
    ``verify_hash`` checks the tensor file's SHA-256 (reads the file once more).
    """
    d = Path(ckpt_dir)
    man = read_manifest(d)
    check_tensor_file(d, man, verify_hash=verify_hash)
    if model is None:
        model = _empty_model(man)
    load_into(model, d, man, runtime=runtime, kernel=kernel)
    meta_left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if meta_left:
        raise CheckpointError(f"parameters left uninitialised after loading: {meta_left[:5]}")
    mark_compressed(model, d, man)
    return model.eval()


def check_tensor_file(d: Path, man: dict, *, verify_hash: bool = True) -> Path:
    """The tensor file the manifest names, checked for presence, size and (optionally) SHA-256."""
    path = d / man["file"]["name"]
    if not path.is_file():
        raise CheckpointError(f"{path}: tensor file missing")
    size = os.stat(path).st_size
    if size != man["file"]["bytes"]:
        raise CheckpointError(f"{path}: {size} bytes but the manifest says {man['file']['bytes']}: the file is "
                              "truncated or was replaced; re-run the quantization")
    if verify_hash and _sha256(path) != man["file"]["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 differs from the manifest: the file was edited or corrupted")
    return path


def mark_compressed(model: nn.Module, ckpt_dir: Path, manifest: dict) -> None:
    """Remember where ``model`` came from, so that ``model.save_pretrained(dir)`` writes a checkpoint directory
    again (the plan, the report and the tokenizer files travel with it)."""
    import types

    model.mcmoe_manifest = manifest
    model.mcmoe_source = Path(ckpt_dir)
    model.save_pretrained = types.MethodType(save_pretrained_compressed, model)


def save_pretrained_compressed(model: nn.Module, save_directory: str | os.PathLike[str], **_: Any) -> None:
    """``save_pretrained`` of a loaded compressed model: :func:`save_quantized` with the manifest's plan, report
    and quantization settings; tokenizer files and pruning settings are copied from the directory it came from."""
    man, src = model.mcmoe_manifest, Path(model.mcmoe_source)
    report = QuantReport.model_validate(man["report"]) if man.get("report") is not None else None
    save_quantized(model, save_directory, plan=QuantPlan.model_validate(man["plan"]), report=report,
                   config=QuantizeConfig.model_validate(man["quantize_config"]), source_dir=src)
    for name in (PRUNING_FILE, Path(PRUNING_FILE).with_suffix(".safetensors").name):
        if (src / name).is_file():
            write_bytes_atomic(Path(save_directory) / name, (src / name).read_bytes())


def load_into(model: nn.Module, d: Path, man: dict, *, runtime: Runtime = Runtime.PACKED,
              kernel: Kernel = Kernel.AUTO) -> nn.Module:
    """Replace ``model``'s quantized modules and assign every stored tensor (strict: see the module docstring).
    Non-persistent buffers are left as they are."""
    path = d / man["file"]["name"]
    dtype = getattr(torch, man["dtype"])
    try:
        fh = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types on a damaged header
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    with fh:
        keys = set(fh.keys())
        want = set(man["tensors"])
        if keys != want:
            raise CheckpointError(f"{path}: tensors differ from the manifest: missing {sorted(want - keys)[:5]}, "
                                  f"unexpected {sorted(keys - want)[:5]}")

        def get(name: str) -> torch.Tensor:
            t = fh.get_tensor(name)
            spec = man["tensors"][name]
            if list(t.shape) != spec["shape"] or _dtype_name(t.dtype) != spec["dtype"]:
                raise CheckpointError(f"{name}: stored {_dtype_name(t.dtype)} {list(t.shape)} but the manifest "
                                      f"says {spec['dtype']} {spec['shape']}")
            return t

        def packed_at(prefix: str, spec: dict) -> PackedTensor:
            meta = PackedMeta(spec["bits"], tuple(spec["shape"]), spec["group_size"])
            fields = {f: get(f"{prefix}.{f}") for f in ("qdata", "scale", "zero", "perm") if f"{prefix}.{f}" in keys}
            try:
                return PackedTensor.from_tensors(fields, meta)
            except ValueError as exc:
                raise CheckpointError(f"{prefix}: {exc}") from exc

        quantized = man["quantized"]
        # fused expert modules
        for name, spec in man["experts"].items():
            try:
                old = model.get_submodule(name)
            except AttributeError as exc:
                raise CheckpointError(f"{name}: the model has no experts module here") from exc
            n_old = getattr(old, "num_experts", None)
            if n_old is not None and n_old != len(spec["experts"]):
                raise CheckpointError(f"{name}: the model has {n_old} experts, the checkpoint {len(spec['experts'])}")
            act = getattr(old, "act_fn")
            mods: list[nn.Module] = []
            for e, item in enumerate(spec["experts"]):
                p = f"{name}.experts.{e}"
                if item["kind"] == "quant":
                    ql = {k: QuantLinear(packed_at(f"{p}.{k}", quantized[f"{p}.{k}"]), runtime=runtime, dtype=dtype,
                                         kernel=kernel)
                          for k in ("gate_up", "down")}
                    mods.append(QuantExpert(ql["down"], act, gate_up=ql["gate_up"]))
                else:
                    mods.append(DenseExpert(get(f"{p}.gate_up"), get(f"{p}.down"), act))
            _replace(model, name, QuantExperts(mods, act))
        # quantized linears (outside fused experts)
        for name, spec in quantized.items():
            if any(name.startswith(x + ".") for x in man["experts"]):
                continue
            try:
                old = model.get_submodule(name)
            except AttributeError as exc:
                raise CheckpointError(f"{name}: the model has no module here") from exc
            if isinstance(old, nn.Linear) and (old.out_features, old.in_features) != tuple(spec["shape"]):
                raise CheckpointError(f"{name}: the model's linear is {(old.out_features, old.in_features)}, "
                                      f"the checkpoint's {tuple(spec['shape'])}")
            if not isinstance(old, (nn.Linear, QuantLinear)):
                raise CheckpointError(f"{name}: expected a linear layer, found {type(old).__name__}")
            bias = get(f"{name}.bias") if spec["bias"] else None
            _replace(model, name, QuantLinear(packed_at(name, spec), bias, runtime=runtime, dtype=dtype,
                                              kernel=kernel))
        # everything else
        handled = {n for n in keys if _owned_by_quant(model, n)}
        state = model.state_dict(keep_vars=True)
        expected = {k for k in state if not _owned_by_quant(model, k)}
        owned = set(state) - expected
        if handled != owned:
            raise CheckpointError(f"{path}: quantized tensors do not fit the model: missing "
                                  f"{sorted(owned - handled)[:5]}, unexpected {sorted(handled - owned)[:5]}")
        available = (keys - handled) | set(man["aliases"])
        missing, unexpected = sorted(expected - available), sorted(available - expected)
        if missing or unexpected:
            raise CheckpointError(f"{path}: does not fit the model: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]} (is it a checkpoint of this architecture?)")
        new_state = {}
        for k in sorted(expected):
            t = get(man["aliases"].get(k, k)) if k not in man["aliases"] else None
            if t is None:
                continue
            if tuple(state[k].shape) != tuple(t.shape):
                raise CheckpointError(f"{k}: the model expects shape {tuple(state[k].shape)}, the checkpoint has "
                                      f"{tuple(t.shape)}")
            new_state[k] = t
        model.load_state_dict(new_state, strict=False, assign=True)
        for alias, target in man["aliases"].items():  # tied weights: one tensor under both names
            mod_a, _, attr_a = alias.rpartition(".")
            mod_t, _, attr_t = target.rpartition(".")
            setattr(model.get_submodule(mod_a), attr_a, getattr(model.get_submodule(mod_t), attr_t))
    return model


def _owned_by_quant(model: nn.Module, key: str) -> bool:
    mod_name = key.rpartition(".")[0]
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return False
    return isinstance(mod, (QuantLinear, DenseExpert))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
