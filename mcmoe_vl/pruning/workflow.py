"""Fit a pruning method on calibration data and write the artifact (what ``mcmoe-vl prune`` runs).

In memory::

    artifact = fit_pruning(model, batches, PruningMethod.ODP, odp=ODPConfig(prune_rate=0.15))
    save_pruning(artifact, "ckpt/pruning.json")

From files (model directory + data as for ``mcmoe-vl calibrate``: a text file, a token-ids file or
``embedded:<name>``)::

    prune_files(PruneRun(model="ckpt", data="calib.txt", output="ckpt/pruning.json", method="otp"))
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from mcmoe_vl.dtypes import parse_dtype
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mcmoe_vl.moe.interface import ExpertInterface

from .artifact import PruningArtifact, PruningMethod, odp_artifact, otp_artifact, save_pruning
from .odp import ODPConfig, fit_odp
from .otp import OTPConfig, train_otp

log = logging.getLogger(__name__)


def fit_pruning(model: nn.Module, batches: Iterable[Mapping[str, Any]], method: PruningMethod, *,
                odp: ODPConfig | None = None, otp: OTPConfig | None = None, progress: bool = True,
                adapter: Any = None) -> PruningArtifact:
    """Fit ODP thresholds or train OTP predictors on ``batches`` and return the artifact (not saved).

    ``adapter``: the model family's adapter (default: ``model_adapters.get_adapter(model)``)."""
    if adapter is None:
        from model_adapters import get_adapter

        adapter = get_adapter(model)
    batches = list(batches)
    with ExpertInterface(model, adapter) as iface:
        if method is PruningMethod.ODP:
            return odp_artifact(iface, fit_odp(model, batches, odp or ODPConfig(), iface=iface))
        cfg = otp or OTPConfig()
        predictors, summary = train_otp(model, batches, cfg, iface=iface, progress=progress)
        return otp_artifact(iface, predictors, summary, cfg.model_dump(mode="json"))


class PruneRun(BaseModel):
    """Everything ``mcmoe-vl prune`` needs."""

    model_config = ConfigDict(extra="forbid")

    model: str  # model directory
    data: str  # text file, token-ids file, or embedded:<name>
    output: str  # the artifact's JSON path (OTP writes a .safetensors beside it)
    method: PruningMethod
    odp: ODPConfig = Field(default_factory=ODPConfig)
    otp: OTPConfig = Field(default_factory=OTPConfig)
    num_sequences: int = Field(32, ge=1)
    seq_len: int = Field(2048, ge=1)
    batch_size: int = Field(1, ge=1)
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    progress: bool = True


def prune_files(run: PruneRun) -> PruningArtifact:
    """Load the model and calibration data, fit, and save the artifact at ``run.output``."""
    from mcmoe_vl.calibration.data import batches_from_ids, check_token_ids
    from mcmoe_vl.calibration.workflow import CalibrationRun, calibration_ids, load_model, model_vocab_size

    from mcmoe_vl.io import check_output_outside

    check_output_outside(run.output, {"model directory": run.model, "calibration data": run.data})
    dtype = parse_dtype(run.dtype)
    if not run.output.endswith(".json"):
        raise ValueError(f"--output must be a .json path, got {run.output}")
    ids = calibration_ids(CalibrationRun(model=run.model, data=run.data, output=run.output,
                                         num_sequences=run.num_sequences, seq_len=run.seq_len, seed=run.seed))
    model = load_model(run.model, dtype=dtype, device=run.device)
    check_token_ids(ids, model_vocab_size(model), where=run.data)
    batches = [{k: v.to(run.device) for k, v in b.items()} for b in batches_from_ids(ids, run.batch_size)]
    log.info("fitting %s on %d sequences x %d tokens", run.method.value, ids.shape[0], ids.shape[1])
    with torch.no_grad():
        artifact = fit_pruning(model, batches, run.method, odp=run.odp, otp=run.otp, progress=run.progress)
    save_pruning(artifact, Path(run.output))
    return artifact
