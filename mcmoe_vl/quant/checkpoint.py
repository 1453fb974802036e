"""The compressed checkpoint: ``model.safetensors`` plus a JSON manifest, written atomically; and its loader.

Layout of a checkpoint directory::

    model.safetensors      every tensor of the quantized model's state: packed linears as
                           <module>.qdata / .scale / .zero / .perm, everything else in its 16-bit dtype
    config.json            the Hugging Face config with a ``quantization_config`` ({"quant_method": "mcmoe_vl",
                           ...}): with ``import mcmoe_vl``, transformers' ``from_pretrained`` loads the directory
                           (:mod:`mcmoe_vl.hf`)
    tokenizer / processor files, generation_config.json
                           copied from the source model's directory when it has them
    quant_manifest.json    the typed :class:`~mcmoe_vl.quant.manifest.Manifest`: model type, architecture, the HF
                           config, dtype, the plan, the quantization settings and report, every packed module and
                           tensor, the tensor file's size and SHA-256, the accounting, and an integrity digest

The manifest is written after the tensors, so a directory with a manifest has a complete tensor file. Writing is
:mod:`mcmoe_vl.quant.saving`, the manifest :mod:`mcmoe_vl.quant.manifest` (validated field by field, with its
integrity digest, on every read), loading :mod:`mcmoe_vl.quant.loading` (strict: a missing, unexpected or
mis-shaped tensor, a truncated or edited file, a parameter left uninitialised are refused, naming the tensor). This
module gathers their public names::

    from mcmoe_vl.quant.checkpoint import save_quantized, load_quantized, read_manifest

    acc = save_quantized(model, "runs/q", plan=plan, report=report, adapter=get_adapter(model))
    model = load_quantized("runs/q")
    read_manifest("runs/q").plan.experts     # {0: [2, 3, 1, 2, ...], ...}
"""

from __future__ import annotations

from .format import (FORMAT, FORMAT_VERSION, MANIFEST_FILE, PRUNING_FILE, QUANT_METHOD, TENSOR_FILE,
                     CheckpointError)
from .loading import check_tensor_file, load_into, load_quantized, mark_compressed, save_pretrained_compressed
from .manifest import Manifest, manifest_digest, quantization_config_dict, read_manifest, seal_manifest
from .saving import SIDE_FILES, account_model, check_output_dir, model_source_dir, save_quantized

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST_FILE", "PRUNING_FILE", "QUANT_METHOD", "SIDE_FILES", "TENSOR_FILE",
    "CheckpointError", "Manifest", "account_model", "check_output_dir", "check_tensor_file", "load_into",
    "load_quantized", "manifest_digest", "mark_compressed", "model_source_dir", "quantization_config_dict",
    "read_manifest", "save_pretrained_compressed", "save_quantized", "seal_manifest",
]
