"""Build, load and save DeepSeek-VL2 in the official checkpoint layout.

The official checkpoint names (``language.model.layers.1.mlp.experts.0.gate_proj.weight``,
``vision.blocks.0.attn.qkv.weight``, ``vision.pos_embed``, ...) are mapped to this port's parameters by an explicit
table, :func:`official_layout`: every official tensor is a list of :class:`Part` s, each copying a slice of the
official tensor to a slice of one of the model's tensors. The table is checked to cover every element of every
model tensor exactly once, so a load that passes the key check leaves nothing at its random initial value.

- :func:`model_from_config` (a config dict in the official layout -> a randomly initialised model),
- :func:`load_official` (a checkpoint directory -> the model; any missing or unexpected key is an error naming it),
- :func:`save_official` (the model -> ``config.json`` + ``model.safetensors`` in the official layout, loadable by
  :func:`load_official` and by the official code),
- :func:`from_pretrained` (either an official checkpoint or a compressed directory written by
  :func:`mcmoe_vl.quant.checkpoint.save_quantized`: packed modules, strict, its pruning settings applied).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import initialization as hf_init

from mcmoe_vl.io import save_safetensors_atomic, write_json_atomic

from .configuration import DeepseekVL2Config, OfficialConfig, parse_official_config
from .modeling import DeepseekVL2ForCausalLM

log = logging.getLogger(__name__)

Index = tuple[Any, ...]


@dataclass(frozen=True)
class Part:
    """``model[port_name][port_index] <-> official[official_index]``."""

    port_name: str
    port_index: Index = ()
    official_index: Index = ()


@dataclass(frozen=True)
class OfficialTensor:
    key: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]


_VISION_RULES = [
    (r"vision\.embeddings\.patch_embedding\.(weight|bias)", r"vision.patch_embed.proj.\1"),
    (r"vision\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"vision.blocks.\1.norm1.\2"),
    (r"vision\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"vision.blocks.\1.norm2.\2"),
    (r"vision\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"vision.blocks.\1.attn.proj.\2"),
    (r"vision\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.blocks.\1.mlp.\2.\3"),
    (r"vision\.post_layernorm\.(weight|bias)", r"vision.norm.\1"),
    (r"vision_attn_pool\.(.+)", r"vision.attn_pool.\1"),
]
_QKV = re.compile(r"vision\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_FUSED = re.compile(r"(language\.model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


def official_layout(model: DeepseekVL2ForCausalLM) -> dict[str, OfficialTensor]:
    """The official tensors of ``model`` and where each element lives in the model (see the module docstring)."""
    state = model.state_dict()
    width = model.config.official.vision.width
    out: dict[str, list[Part]] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def add(key: str, shape: tuple[int, ...], part: Part) -> None:
        out.setdefault(key, []).append(part)
        shapes[key] = shape

    for name, t in state.items():
        shape = tuple(t.shape)
        if m := _QKV.fullmatch(name):
            j = "qkv".index(m.group(2))
            key = f"vision.blocks.{m.group(1)}.attn.qkv.{m.group(3)}"
            add(key, (3 * width, *shape[1:]), Part(name, (), (slice(j * width, (j + 1) * width),)))
            continue
        if name == "vision.embeddings.position_embedding.weight":
            add("vision.pos_embed", (1, *shape), Part(name, (), (0,)))
            continue
        if m := _FUSED.fullmatch(name):
            e_count = shape[0]
            if m.group(2) == "gate_up_proj":
                inter = shape[1] // 2
                for e in range(e_count):
                    for j, proj in enumerate(("gate_proj", "up_proj")):
                        add(f"{m.group(1)}.{e}.{proj}.weight", (inter, shape[2]),
                            Part(name, (e, slice(j * inter, (j + 1) * inter))))
            else:
                for e in range(e_count):
                    add(f"{m.group(1)}.{e}.down_proj.weight", shape[1:], Part(name, (e,)))
            continue
        for pat, rep in _VISION_RULES:
            if re.fullmatch(pat, name):
                add(re.sub(pat, rep, name), shape, Part(name))
                break
        else:
            if name.startswith("vision."):
                raise RuntimeError(f"no official name for vision tensor {name!r}")
            add(name, shape, Part(name))  # language.*, projector.*, image_newline, view_seperator: same names
    layout = {k: OfficialTensor(k, shapes[k], tuple(v)) for k, v in out.items()}
    _check_coverage(layout, state)
    return layout


def official_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of the model outside its routed experts (any subset of its state, e.g. what a compressed model keeps
    in 16 bits), by their names in this port, under their official names and shapes: a vision block's q / k / v
    merged into ``attn.qkv`` (all three must be given), the position embedding with its leading 1, the renamed
    vision tensors; language and projector tensors keep their names. The same mapping as :func:`official_layout`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if m := _QKV.fullmatch(name):
            qkv.setdefault(f"vision.blocks.{m.group(1)}.attn.qkv.{m.group(3)}", {})[m.group(2)] = t
        elif name == "vision.embeddings.position_embedding.weight":
            out["vision.pos_embed"] = t[None]
        elif _FUSED.fullmatch(name):
            raise ValueError(f"{name}: fused routed experts have one official tensor per expert; split them first")
        else:
            rule = next(((p, r) for p, r in _VISION_RULES if re.fullmatch(p, name)), None)
            if rule is None and name.startswith("vision."):
                raise RuntimeError(f"no official name for vision tensor {name!r}")
            out[re.sub(rule[0], rule[1], name) if rule else name] = t
    for key, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{key}: the official tensor needs q, k and v; got {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _check_coverage(layout: dict[str, OfficialTensor], state: dict[str, torch.Tensor]) -> None:
    # Every element of every model tensor is written by exactly one official slice. Parts index only leading dims,
    # so counting over those dims (e.g. (E, 2I) for a fused (E, 2I, H) tensor) is exact and small.
    parts: dict[str, list[Part]] = {name: [] for name in state}
    for ot in layout.values():
        for p in ot.parts:
            parts[p.port_name].append(p)
    counts = {}
    for name, ps in parts.items():
        depth = max((len(p.port_index) for p in ps), default=0)
        c = torch.zeros(tuple(state[name].shape[:depth]), dtype=torch.int32)
        for p in ps:
            c[p.port_index] += 1
        counts[name] = c
    bad = [n for n, c in counts.items() if not bool((c == 1).all())]
    if bad:
        raise RuntimeError(f"official layout does not cover these tensors exactly once: {bad}")


# -- construction ---------------------------------------------------------------------------------------------------


def _config(config: dict[str, Any] | OfficialConfig | DeepseekVL2Config) -> DeepseekVL2Config:
    if isinstance(config, DeepseekVL2Config):
        return config
    return DeepseekVL2Config.from_official(config)


def model_from_config(
    config: dict[str, Any] | OfficialConfig | DeepseekVL2Config,
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> DeepseekVL2ForCausalLM:
    """A randomly initialised model from an official-layout config dict (e.g. for training a small VLM)."""
    cfg = _config(config)
    _set_attn(cfg, attn_implementation)
    if seed is not None:
        torch.manual_seed(seed)
    model = DeepseekVL2ForCausalLM(cfg).to(dtype)
    return model.eval()


def _set_attn(cfg: DeepseekVL2Config, impl: str) -> None:
    if impl not in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
        raise ValueError(f"attn_implementation={impl!r}; valid: eager, sdpa, flash_attention_2, flex_attention")
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = impl


def _empty_model(cfg: DeepseekVL2Config, dtype: torch.dtype, device: str | torch.device) -> DeepseekVL2ForCausalLM:
    # Allocated in the target dtype on the target device, not initialised: every tensor is overwritten by the
    # checkpoint (coverage is checked), so a GPU load needs no CPU copy of the model.
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), hf_init.no_init_weights():
            model = DeepseekVL2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype)


# -- reading and writing --------------------------------------------------------------------------------------------


def read_official_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no config.json (expected an official DeepSeek-VL2 checkpoint directory)")
    return json.loads(cfg_path.read_text())


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.name != "reference_outputs.safetensors"]
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                yield k, h


def load_official(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> DeepseekVL2ForCausalLM:
    """Load an official DeepSeek-VL2 checkpoint directory (``config.json`` + safetensors, sharded or not).

    Tensors are streamed into the model one at a time (peak memory: the model plus one tensor). Raises on any
    missing, unexpected or wrongly shaped key, naming it.
    """
    path = Path(path)
    cfg = DeepseekVL2Config.from_official(read_official_config(path))
    _set_attn(cfg, attn_implementation)
    files = _safetensors_files(path)
    # Check the keys before the (long) copy.
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                found[k] = tuple(h.get_slice(k).get_shape())
    model = _empty_model(cfg, dtype, device)
    layout = official_layout(model)
    missing = sorted(set(layout) - set(found))
    unexpected = sorted(set(found) - set(layout))
    if missing or unexpected:
        raise KeyError(
            f"{path}: checkpoint does not match the config: missing {len(missing)} {missing[:20]}, unexpected "
            f"{len(unexpected)} {unexpected[:20]}"
        )
    wrong = [(k, found[k], layout[k].shape) for k in layout if found[k] != layout[k].shape]
    if wrong:
        raise ValueError(f"{path}: tensors with the wrong shape (key, checkpoint, expected): {wrong[:20]}")
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for key, h in _iter_tensors(files):
            src = h.get_tensor(key)
            for p in layout[key].parts:
                dst = params[p.port_name]
                dst[p.port_index].copy_(src[p.official_index])
    model.config._name_or_path = str(path)  # where its tokenizer is; a compressed copy may not be written here
    return model.eval()


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    apply_pruning: bool = True,
    runtime: str = "packed",
) -> DeepseekVL2ForCausalLM:
    """An official checkpoint (:func:`load_official`) or a compressed directory (:func:`load_compressed`)."""
    from mcmoe_vl.quant.checkpoint import MANIFEST_FILE

    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return load_compressed(path, device=device, apply_pruning=apply_pruning, runtime=runtime,
                               attn_implementation=attn_implementation)
    return load_official(path, dtype=dtype or torch.float32, device=device,
                         attn_implementation=attn_implementation or "sdpa")


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu", apply_pruning: bool = True,
                    runtime: str = "packed", attn_implementation: str | None = None) -> DeepseekVL2ForCausalLM:
    """A compressed directory: config.json (official layout) checked against the integrity-checked manifest, the
    packed model loaded strictly by :func:`mcmoe_vl.quant.checkpoint.load_quantized`, pruning settings applied."""
    from accelerate import init_empty_weights

    from mcmoe_vl.hf.quantizer import apply_saved_pruning, config_mismatches
    from mcmoe_vl.quant.checkpoint import PRUNING_FILE, CheckpointError, load_quantized, read_manifest
    from mcmoe_vl.quant.qlinear import Runtime

    path = Path(path)
    man = read_manifest(path)
    official = {k: v for k, v in read_official_config(path).items() if k != "quantization_config"}
    cfg = DeepseekVL2Config.from_official(official)
    have = json.loads(json.dumps(cfg.to_dict(), default=lambda o: o.model_dump(mode="json")))
    bad = config_mismatches(man.config or {}, have)
    if bad:
        raise CheckpointError(f"{path / 'config.json'} differs from the model config in the manifest in {bad[:8]}: "
                              "it was edited; the packed weights were made for the manifest's")
    _set_attn(cfg, attn_implementation or man.attn_implementation or "sdpa")
    with init_empty_weights(include_buffers=False):
        skeleton = DeepseekVL2ForCausalLM(cfg).to(getattr(torch, man.dtype))
    from .adapter import DeepseekVL2Adapter

    model = load_quantized(path, model=skeleton.eval(), runtime=Runtime(runtime),
                           adapter=DeepseekVL2Adapter()).to(device)
    model.config._name_or_path = str(path)
    model.mcmoe_pruning = apply_saved_pruning(model, path / PRUNING_FILE) if apply_pruning else None
    return model


def official_state_dict(model: DeepseekVL2ForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under their official names and shapes."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, ot in official_layout(model).items():
        first = state[ot.parts[0].port_name]
        t = torch.empty(ot.shape, dtype=first.dtype)
        for p in ot.parts:
            t[p.official_index] = state[p.port_name][p.port_index].detach().cpu()
        out[key] = t.contiguous()
    return out


def save_official(model: DeepseekVL2ForCausalLM, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` in the official layout (atomically). Returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_official_dict()
    save_safetensors_atomic(path / "model.safetensors", official_state_dict(model), metadata={"format": "pt"})
    write_json_atomic(path / "config.json", config)
    return path


__all__ = [
    "OfficialTensor",
    "Part",
    "load_official",
    "model_from_config",
    "official_layout",
    "official_state_dict",
    "official_tensors",
    "parse_official_config",
    "read_official_config",
    "save_official",
]
