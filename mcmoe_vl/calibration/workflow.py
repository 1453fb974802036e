"""Calibrate a model directory on a data file and save the statistics (what ``mcmoe-vl calibrate`` runs).

::

    calibrate_files(CalibrationRun(model="path/to/model", data="calib.txt", output="runs/stats.json"))

Data: a text file (tokenized with the model directory's tokenizer), a token-ids file (``.json`` /
``.safetensors``, see :mod:`.data`), or ``embedded:<split>`` for the package's embedded corpora
(:func:`mcmoe_vl.data.embedded_texts`: ``train`` / ``heldout`` / ``ood`` are the embedded language model's training
sample, held-out source files and out-of-domain prose). From one token stream, ``num_sequences`` seeded random windows of ``seq_len`` tokens
are drawn (the paper: 128 x 2048 from C4); token-ids files are used as they are (first ``num_sequences`` rows).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mcmoe_vl.dtypes import parse_dtype
from mcmoe_vl.io import check_output_outside, checkpoint_fingerprint
from pydantic import BaseModel, ConfigDict, Field

from .calibrate import CalibrationConfig, calibrate
from .data import batches_from_ids, check_token_ids, load_token_ids, token_windows
from .stats import CalibrationStats

log = logging.getLogger(__name__)



class CalibrationRun(BaseModel):
    """Everything ``mcmoe-vl calibrate`` needs."""

    model_config = ConfigDict(extra="forbid")

    model: str  # a model directory (Hugging Face layout, or an official DeepSeek-VL2 checkpoint)
    data: str  # text file, token-ids file, or embedded:<name>
    output: str
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    num_sequences: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=1)
    batch_size: int = Field(1, ge=1)
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    resume: bool = True
    significance_plot: str | None = None  # also write the Fig. 3 heatmaps here (PNG)
    progress: bool = True


def check_model_dir(path: str | os.PathLike[str]) -> str:
    """A local model directory with a ``config.json`` whose ``model_type`` has an adapter; returns the model_type.

    Checked before any tokenizer or weights are loaded, so a wrong path or an unsupported family gets this
    project's message (the path, or the registered adapters), not one about the Hugging Face Hub.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model directory {p} does not exist (a local directory with config.json and "
                                f"*.safetensors is expected)")
    if not p.is_dir():
        raise ValueError(f"model {p} is a file; give the model's directory (config.json, *.safetensors)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model directory {p} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_file} is not valid JSON ({exc})") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    from model_adapters import ADAPTERS

    from mcmoe_vl.registry import RegistryError

    try:
        ADAPTERS.get(str(model_type))
    except RegistryError as exc:
        raise ValueError(f"{cfg_file}: model_type {model_type!r} has no adapter: {exc}") from None
    return str(model_type)


def load_model(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a causal LM from a local directory through its family's adapter (:meth:`MoEAdapter.load_model`:
    transformers, or the family's own port), every weight checked finite."""
    from model_adapters import get_adapter

    p = Path(path)
    return _finite(get_adapter(check_model_dir(p)).load_model(p, dtype=dtype, device=device))


def _finite(model: Any) -> Any:
    """The model, once every weight is checked finite (NaN / inf named by layer and expert, or by tensor)."""
    from model_adapters import get_adapter

    from mcmoe_vl.moe.checks import check_finite_weights

    check_finite_weights(model, get_adapter(model).moe_layers(model))
    return model


def moe_layout(path: str | os.PathLike[str]) -> dict[int, int]:
    """Decoder layer index -> routed experts of every MoE layer of a model directory, read from its config alone
    (the model is built on the meta device: no weights are read or allocated)."""
    from model_adapters import get_adapter

    adapter = get_adapter(check_model_dir(path))
    model = adapter.meta_model(path)
    return {la.index: la.num_experts for la in adapter.moe_layers(model)}


def calibration_text(data: str) -> str:
    """Text of a ``.txt`` file, of an embedded split (``embedded:<split>``, :func:`mcmoe_vl.data.embedded_texts`;
    documents joined by blank lines) or of a Hugging Face dataset (``hf:<dataset>[:<config>[:<split>]]``)."""
    if data.startswith("embedded"):
        from mcmoe_vl.data import embedded_texts

        return "\n\n".join(embedded_texts(data.split(":", 1)[1] if ":" in data else "train"))
    if data.startswith("hf:"):
        from mcmoe_vl.data.hub import hub_text

        return hub_text(data)
    p = Path(data)
    if not p.is_file():
        raise FileNotFoundError(f"calibration data not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"calibration text {p} is not UTF-8 (byte {exc.start}: {exc.reason}); valid: a UTF-8 text "
                         "file, a token-ids file (.json / .safetensors), embedded:<split> or hf:<dataset>") from None


def calibration_ids(run: CalibrationRun | Any) -> torch.Tensor:
    """The (N, S) calibration token ids the run describes.

    ``run`` is any run config with ``data``, ``model``, ``num_sequences``, ``seq_len`` and ``seed`` (the calibrate,
    quantize and prune workflows share these rules).
    """
    check_model_dir(run.model)
    p = Path(run.data)
    if p.suffix in (".json", ".safetensors") and not run.data.startswith("embedded"):
        return load_token_ids(p)[: run.num_sequences]
    text = calibration_text(run.data)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(run.model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{run.model}: no tokenizer to encode text calibration data ({exc}); save one with the "
                         "model or pass a token-ids file") from exc
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return token_windows(ids, run.seq_len, run.num_sequences, seed=run.seed)


def model_vocab_size(model: Any) -> int | None:
    """The language model's vocabulary size from its config (the text config of a VLM), if it has one."""
    return getattr(getattr(model.config, "text_config", None) or model.config, "vocab_size", None)


def calibrate_files(run: CalibrationRun) -> CalibrationStats:
    """Load the model and data, run :func:`calibrate` (resumable) and save the statistics (and heatmaps)."""
    for out in (run.output, run.significance_plot):
        if out:
            check_output_outside(out, {"model directory": run.model, "calibration data": run.data})
    dtype = parse_dtype(run.dtype)
    ids = calibration_ids(run)  # before loading the model: bad data fails fast
    fingerprint = checkpoint_fingerprint(run.model)["files"]  # the weights' identity, recorded in the statistics
    model = load_model(run.model, dtype=dtype, device=run.device)
    check_token_ids(ids, model_vocab_size(model), where=run.data)
    batches = [{k: v.to(run.device) for k, v in b.items()} for b in batches_from_ids(ids, run.batch_size)]
    log.info("calibrating %s on %d sequences x %d tokens", run.model, ids.shape[0], ids.shape[1])
    stats = calibrate(model, batches, run.calibration, output=run.output, resume=run.resume,
                      model_name=Path(run.model).name, model_fingerprint=fingerprint, progress=run.progress)
    if run.significance_plot:
        from mcmoe_vl.plots import significance_heatmaps

        significance_heatmaps(stats, run.significance_plot)
    return stats
