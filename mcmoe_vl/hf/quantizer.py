"""The transformers quantizer for ``quant_method = "mcmoe_vl"`` checkpoints (see :mod:`mcmoe_vl.hf`).

transformers builds the model skeleton on the meta device, then calls
:meth:`McMoeQuantizer._process_model_before_weight_loading`, which reads and verifies the manifest, checks that
config.json describes the model the manifest was made from, and loads the packed modules and every stored tensor
with :func:`mcmoe_vl.quant.checkpoint.load_into` (strict: a missing, unexpected or mis-shaped tensor is an error).
transformers' own loader then reads the same file into the same names without casting (:meth:`get_new_dtype`), and
:meth:`_process_model_after_weight_loading` refuses any tensor still uninitialised and installs the pruning rules.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcmoe_vl.quant.format import FORMAT, FORMAT_VERSION, MANIFEST_FILE, PRUNING_FILE, QUANT_METHOD, CheckpointError

log = logging.getLogger(__name__)

_OPTIONS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("mcmoe_vl_loading_options", default={})
# config keys that legitimately differ between the manifest's copy and config.json after a save/load round trip
_VOLATILE = {"transformers_version", "_name_or_path", "architectures", "quantization_config", "dtype", "torch_dtype",
             "_attn_implementation_autoset", "output_attentions", "use_cache", "return_dict"}


@contextlib.contextmanager
def loading_options(*, apply_pruning: bool = True, runtime: str = "packed") -> Iterator[None]:
    """Options for ``from_pretrained`` calls inside the block: ``apply_pruning=False`` loads without the
    directory's pruning settings; ``runtime="fake"`` caches the dequantised weights (16-bit memory, faster, the
    same outputs bit for bit; see :class:`mcmoe_vl.quant.qlinear.Runtime`)."""
    from mcmoe_vl.quant.qlinear import Runtime

    token = _OPTIONS.set({"apply_pruning": apply_pruning, "runtime": Runtime(runtime)})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def config_mismatches(manifest_config: dict, config: dict) -> list[str]:
    """Keys whose value in config.json differs from the (integrity-checked) manifest's copy."""
    out = []
    for key, want in manifest_config.items():
        if key in _VOLATILE or key.startswith("_"):
            continue
        have = config.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            out += [f"{key}.{k}" for k in config_mismatches(want, have)]
        elif have != want:
            out.append(key)
    return out


# Two class definitions inside a function so that transformers is imported only when a checkpoint is loaded; each
# method is short, the length is the class bodies'.
def _classes() -> tuple[type, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @dataclass
    class McMoeConfig(QuantizationConfigMixin):
        """``quantization_config`` of an mcmoe_vl checkpoint directory (written by ``save_quantized``)."""

        quant_method: str = QUANT_METHOD
        format: str = FORMAT
        format_version: int = FORMAT_VERSION
        manifest: str = MANIFEST_FILE
        dtype: str = "bfloat16"
        pruning_file: str = PRUNING_FILE
        apply_pruning: bool = True
        attn_implementation: str | None = None  # the one the model was quantized with: the default on load

        def __post_init__(self) -> None:
            if self.format != FORMAT or self.format_version != FORMAT_VERSION:
                raise CheckpointError(f"quantization_config: format {self.format!r} version {self.format_version} "
                                      f"is not supported (this loader reads {FORMAT!r} version {FORMAT_VERSION})")

    class McMoeQuantizer(HfQuantizer):
        """Loads packed mcmoe_vl checkpoints; see the module docstring."""

        requires_calibration = True  # a pre-quantized format only: transformers cannot quantize with it

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.ckpt_dir: Path | None = None
            self.manifest: Any | None = None  # mcmoe_vl.quant.manifest.Manifest, once read

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            return None

        def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
            want = getattr(torch, self.quantization_config.dtype)
            if dtype not in (None, "auto", want):
                raise CheckpointError(f"this checkpoint was quantized in {want}; load it with dtype={want} or "
                                      "dtype='auto' (packed weights cannot change dtype)")
            return want

        def update_attn_implementation(self, config: Any) -> Any:
            saved = self.quantization_config.attn_implementation
            if config._attn_implementation is None and saved:
                config._attn_implementation = saved  # an explicit attn_implementation= still wins
            return config

        def get_new_dtype(self, converter: Any, param: Any, dtype: Any) -> None:
            return None  # every tensor keeps its stored dtype: the packed codes, scales and 16-bit parts

        def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                                 **kwargs: Any) -> Any:
            from mcmoe_vl.quant.checkpoint import check_tensor_file, load_into, read_manifest

            if not checkpoint_files:
                raise CheckpointError("an mcmoe_vl checkpoint must be loaded from a local directory")
            d = Path(checkpoint_files[0]).parent
            man = read_manifest(d)
            bad = config_mismatches(man.config or {},
                                    json.loads(model.config.to_json_string(use_diff=False)))
            if bad:
                raise CheckpointError(f"{d / 'config.json'} differs from the model config in {MANIFEST_FILE} in "
                                      f"{bad[:8]}: it was edited; the packed weights were made for the manifest's")
            check_tensor_file(d, man)
            load_into(model, d, man, runtime=_OPTIONS.get().get("runtime", "packed"))
            self.ckpt_dir, self.manifest = d, man
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                    if t.device.type == "meta"]
            if left:
                raise CheckpointError(f"parameters left uninitialised after loading: {left[:5]}")
            assert self.ckpt_dir is not None and self.manifest is not None
            from mcmoe_vl.quant.checkpoint import mark_compressed
            from mcmoe_vl.quant.qlinear import Runtime, set_runtime

            if _OPTIONS.get().get("runtime") is Runtime.FAKE:
                set_runtime(model, Runtime.FAKE)  # the caches from the tensors as finally loaded
            from model_adapters import get_adapter

            mark_compressed(model, self.ckpt_dir, self.manifest, get_adapter(model))
            apply = _OPTIONS.get().get("apply_pruning", True) and self.quantization_config.apply_pruning
            model.mcmoe_pruning = apply_saved_pruning(model, self.ckpt_dir / self.quantization_config.pruning_file) \
                if apply else None
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return McMoeConfig, McMoeQuantizer


def apply_saved_pruning(model: Any, path: Path) -> Any:
    """Install the pruning rule saved at ``path`` (if the file exists) on ``model``; returns the rule or None."""
    if not path.is_file():
        return None
    from model_adapters import expert_interface

    from mcmoe_vl.pruning.artifact import apply_pruning, load_pruning

    rule = apply_pruning(expert_interface(model), load_pruning(path))
    log.info("applied the pruning settings of %s", path)
    return rule


_REGISTERED: dict[str, type] = {}


def register() -> None:
    """Register the ``mcmoe_vl`` quantization method with transformers (idempotent)."""
    if _REGISTERED:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer,
    )

    config_cls, quantizer_cls = _classes()
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(quantizer_cls)
    _REGISTERED.update(config=AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD],
                       quantizer=AUTO_QUANTIZER_MAPPING[QUANT_METHOD])
