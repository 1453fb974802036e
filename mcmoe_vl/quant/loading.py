"""Loading the compressed checkpoint (:func:`load_quantized`; the layout is in :mod:`mcmoe_vl.quant.checkpoint`).

The model is built without allocating its dense weights (parameters on the meta device), the quantized modules are
replaced, every tensor is assigned, and anything that does not fit is refused with a message naming the tensor: a
missing or unexpected tensor, a shape or dtype that differs from the manifest or the model, a file whose size or
hash differs from the manifest (truncated or edited), and any parameter left uninitialised.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mcmoe_vl.io import file_sha256, write_bytes_atomic

from .format import PRUNING_FILE, CheckpointError
from .manifest import ExpertsModule, Manifest, QuantizedModule, read_manifest
from .packed import PackedMeta, PackedTensor
from .qlinear import DenseExpert, Kernel, QuantExpert, QuantExperts, QuantLinear, Runtime
from .saving import dtype_name, save_quantized


def _empty_model(manifest: Manifest) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    cfg_dict = dict(manifest.config or {})
    model_type = cfg_dict.pop("model_type", manifest.model_type)
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
    except ValueError as exc:
        raise CheckpointError(f"cannot rebuild a {model_type!r} config ({exc}); pass the model skeleton as "
                              "load_quantized(..., model=...)") from exc
    cls = getattr(transformers, manifest.architecture, None)
    if cls is None:
        raise CheckpointError(f"transformers has no class {manifest.architecture!r}; pass the model skeleton "
                              "as load_quantized(..., model=...)")
    dtype = getattr(torch, manifest.dtype)
    with init_empty_weights(include_buffers=False):
        kw = {"attn_implementation": manifest.attn_implementation} if manifest.attn_implementation else {}
        model = cls._from_config(config, dtype=dtype, **kw)
    return model.eval()


def load_quantized(
    ckpt_dir: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    runtime: Runtime = Runtime.PACKED,
    kernel: Kernel = Kernel.AUTO,
    verify_hash: bool = True,
    adapter: Any | None = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`mcmoe_vl.quant.saving.save_quantized`.

    ``model``: an (unquantized) instance of the architecture to load into, e.g. built under
    ``accelerate.init_empty_weights()``; by default the transformers class named in the manifest is built that
    way. ``runtime``: packed or fake-quant; ``kernel``: how the packed runtime multiplies (see :class:`Kernel`).
    ``verify_hash`` checks the tensor file's SHA-256 (reads the file once more). ``adapter``: the model family's
    (``model_adapters.get_adapter``), needed only to save the loaded model again (``model.save_pretrained``);
    :meth:`model_adapters.base.MoEAdapter.load_compressed` passes its own.
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
    mark_compressed(model, d, man, adapter)
    return model.eval()


def check_tensor_file(d: Path, man: Manifest, *, verify_hash: bool = True) -> Path:
    """The tensor file the manifest names, checked for presence, size and (optionally) SHA-256."""
    path = d / man.file.name
    if not path.is_file():
        raise CheckpointError(f"{path}: tensor file missing")
    size = os.stat(path).st_size
    if size != man.file.bytes:
        raise CheckpointError(f"{path}: {size} bytes but the manifest says {man.file.bytes}: the file is "
                              "truncated or was replaced; re-run the quantization")
    if verify_hash and file_sha256(path) != man.file.sha256:
        raise CheckpointError(f"{path}: SHA-256 differs from the manifest: the file was edited or corrupted")
    return path


def mark_compressed(model: nn.Module, ckpt_dir: Path, manifest: Manifest, adapter: Any | None = None) -> None:
    """Remember where ``model`` came from and its family's ``adapter``, so that ``model.save_pretrained(dir)``
    writes a checkpoint directory again (the plan, the report and the tokenizer files travel with it)."""
    model.mcmoe_manifest = manifest
    model.mcmoe_adapter = adapter
    model.mcmoe_source = Path(ckpt_dir)
    model.save_pretrained = types.MethodType(save_pretrained_compressed, model)


def save_pretrained_compressed(model: nn.Module, save_directory: str | os.PathLike[str], **_: Any) -> None:
    """``save_pretrained`` of a loaded compressed model: :func:`save_quantized` with the manifest's plan, report
    and quantization settings; tokenizer files and pruning settings are copied from the directory it came from."""
    man, src = model.mcmoe_manifest, Path(model.mcmoe_source)
    adapter = getattr(model, "mcmoe_adapter", None)
    if adapter is None:
        raise CheckpointError(f"{src}: this model was loaded without its family's adapter, which saving needs; load "
                              "it with load_quantized(..., adapter=model_adapters.get_adapter(model_type)), the "
                              "adapter's load_compressed, or transformers' from_pretrained")
    save_quantized(model, save_directory, plan=man.plan, report=man.report, config=man.quantize_config,
                   adapter=adapter, source_dir=src)
    for name in (PRUNING_FILE, Path(PRUNING_FILE).with_suffix(".safetensors").name):
        if (src / name).is_file():
            write_bytes_atomic(Path(save_directory) / name, (src / name).read_bytes())


class _TensorReader:
    """The checkpoint's tensor file, each tensor checked against the manifest as it is read."""

    def __init__(self, fh: Any, path: Path, man: Manifest):
        self.fh, self.path, self.man = fh, path, man
        self.keys = set(fh.keys())
        want = set(man.tensors)
        if self.keys != want:
            raise CheckpointError(f"{path}: tensors differ from the manifest: missing {sorted(want - self.keys)[:5]}, "
                                  f"unexpected {sorted(self.keys - want)[:5]}")

    def get(self, name: str) -> torch.Tensor:
        t = self.fh.get_tensor(name)
        spec = self.man.tensors[name]
        if list(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
            raise CheckpointError(f"{name}: stored {dtype_name(t.dtype)} {list(t.shape)} but the manifest "
                                  f"says {spec.dtype} {spec.shape}")
        return t

    def packed(self, prefix: str, spec: QuantizedModule) -> PackedTensor:
        meta = PackedMeta(spec.bits, tuple(spec.shape), spec.group_size)
        fields = {f: self.get(f"{prefix}.{f}") for f in ("qdata", "scale", "zero", "perm")
                  if f"{prefix}.{f}" in self.keys}
        try:
            return PackedTensor.from_tensors(fields, meta)
        except ValueError as exc:
            raise CheckpointError(f"{prefix}: {exc}") from exc


def _load_experts(model: nn.Module, name: str, spec: ExpertsModule, rd: _TensorReader, **qkw: Any) -> None:
    """Replace the fused experts module ``name`` with its packed (or dense) experts."""
    try:
        old = model.get_submodule(name)
    except AttributeError as exc:
        raise CheckpointError(f"{name}: the model has no experts module here") from exc
    n_old = getattr(old, "num_experts", None)
    if n_old is not None and n_old != len(spec.experts):
        raise CheckpointError(f"{name}: the model has {n_old} experts, the checkpoint {len(spec.experts)}")
    act = getattr(old, "act_fn")
    mods: list[nn.Module] = []
    for e, item in enumerate(spec.experts):
        p = f"{name}.experts.{e}"
        if item.kind == "quant":
            ql = {k: QuantLinear(rd.packed(f"{p}.{k}", rd.man.quantized[f"{p}.{k}"]), **qkw)
                  for k in ("gate_up", "down")}
            mods.append(QuantExpert(ql["down"], act, gate_up=ql["gate_up"]))
        else:
            mods.append(DenseExpert(rd.get(f"{p}.gate_up"), rd.get(f"{p}.down"), act))
    _replace(model, name, QuantExperts(mods, act))


def _load_linear(model: nn.Module, name: str, spec: QuantizedModule, rd: _TensorReader, **qkw: Any) -> None:
    """Replace the linear layer ``name`` with its packed form."""
    try:
        old = model.get_submodule(name)
    except AttributeError as exc:
        raise CheckpointError(f"{name}: the model has no module here") from exc
    if isinstance(old, nn.Linear) and (old.out_features, old.in_features) != tuple(spec.shape):
        raise CheckpointError(f"{name}: the model's linear is {(old.out_features, old.in_features)}, "
                              f"the checkpoint's {tuple(spec.shape)}")
    if not isinstance(old, (nn.Linear, QuantLinear)):
        raise CheckpointError(f"{name}: expected a linear layer, found {type(old).__name__}")
    bias = rd.get(f"{name}.bias") if spec.bias else None
    _replace(model, name, QuantLinear(rd.packed(name, spec), bias, **qkw))


def _load_rest(model: nn.Module, rd: _TensorReader) -> None:
    """Assign every tensor outside the quantized modules (strict), then tie the aliased weights."""
    man, path = rd.man, rd.path
    handled = {n for n in rd.keys if _owned_by_quant(model, n)}
    state = model.state_dict(keep_vars=True)
    expected = {k for k in state if not _owned_by_quant(model, k)}
    owned = set(state) - expected
    if handled != owned:
        raise CheckpointError(f"{path}: quantized tensors do not fit the model: missing "
                              f"{sorted(owned - handled)[:5]}, unexpected {sorted(handled - owned)[:5]}")
    available = (rd.keys - handled) | set(man.aliases)
    missing, unexpected = sorted(expected - available), sorted(available - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]} (is it a checkpoint of this architecture?)")
    new_state = {}
    for k in sorted(expected - set(man.aliases)):
        t = rd.get(k)
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{k}: the model expects shape {tuple(state[k].shape)}, the checkpoint has "
                                  f"{tuple(t.shape)}")
        new_state[k] = t
    model.load_state_dict(new_state, strict=False, assign=True)
    for alias, target in man.aliases.items():  # tied weights: one tensor under both names
        mod_a, _, attr_a = alias.rpartition(".")
        mod_t, _, attr_t = target.rpartition(".")
        setattr(model.get_submodule(mod_a), attr_a, getattr(model.get_submodule(mod_t), attr_t))


def load_into(model: nn.Module, d: Path, man: Manifest, *, runtime: Runtime = Runtime.PACKED,
              kernel: Kernel = Kernel.AUTO) -> nn.Module:
    """Replace ``model``'s quantized modules and assign every stored tensor (strict: see the module docstring).
    Non-persistent buffers are left as they are."""
    path = d / man.file.name
    qkw = {"runtime": runtime, "dtype": getattr(torch, man.dtype), "kernel": kernel}
    try:
        fh = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types on a damaged header
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    with fh:
        rd = _TensorReader(fh, path, man)
        for name, spec in man.experts.items():  # fused expert modules
            _load_experts(model, name, spec, rd, **qkw)
        for name, spec in man.quantized.items():  # quantized linears outside fused experts
            if not any(name.startswith(x + ".") for x in man.experts):
                _load_linear(model, name, spec, rd, **qkw)
        _load_rest(model, rd)
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
