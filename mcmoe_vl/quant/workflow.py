"""File workflow: model directory + plan + calibration data -> compressed checkpoint directory.

Example::

    from mcmoe_vl.quant.workflow import QuantizeRun, quantize_files
    acc = quantize_files(QuantizeRun(model="models/mixtral", plan="runs/plan.json", data="calib.txt",
                                     output="runs/mixtral-2.5b"))
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mcmoe_vl.dtypes import parse_dtype

from .accounting import Accounting
from .checkpoint import save_quantized
from .model import QuantizeConfig, quantize_model
from .plan import BitPlan, load_plan

log = logging.getLogger(__name__)



class QuantizeRun(BaseModel):
    """Everything ``mcmoe-vl quantize`` needs."""

    model_config = ConfigDict(extra="forbid")

    model: str  # model directory (Hugging Face layout, or an official DeepSeek-VL2 checkpoint)
    plan: str  # bit plan JSON: from `mcmoe-vl allocate` or hand-written
    data: str  # text file, token-ids file (.json / .safetensors), or embedded:<split>
    output: str  # checkpoint directory to write
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    num_sequences: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=1)
    batch_size: int = Field(1, ge=1)
    seed: int = 0
    dtype: str = "bfloat16"
    device: str = "cpu"


def _weights_part(files: dict[str, Any]) -> dict[str, Any]:
    """The entries of a checkpoint fingerprint that identify the weights: weight files and config.json."""
    return {k: v for k, v in files.items() if k == "config.json" or k.endswith((".safetensors", ".bin", ".pt"))}


def check_plan_source(plan: BitPlan, model_dir: str) -> None:
    """An allocator plan records the weights its statistics were measured on; quantizing other weights with it is an
    error naming the files that differ (hand-written plans, and plans from in-memory calibration, carry no file
    fingerprint and are not checked)."""
    from mcmoe_vl.io import checkpoint_fingerprint

    recorded = plan.source.get("model_fingerprint")
    if not isinstance(recorded, dict):
        return
    want, have = _weights_part(recorded), _weights_part(checkpoint_fingerprint(model_dir)["files"])
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if differ:
        raise ValueError(f"the plan was allocated from statistics measured on other weights than {model_dir} "
                         f"(differing files: {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); "
                         f"calibrate and allocate on this model, or give a hand-written plan")


def quantize_files(run: QuantizeRun) -> Accounting:
    """Load model, plan and calibration data, quantize, save; returns the checkpoint's accounting."""
    from mcmoe_vl.calibration.data import batches_from_ids, check_token_ids
    from mcmoe_vl.calibration.workflow import calibration_ids, load_model, model_vocab_size

    from mcmoe_vl.io import check_output_outside

    check_output_outside(run.output, {"model directory": run.model, "plan": run.plan, "calibration data": run.data},
                         what="output directory")
    dtype = parse_dtype(run.dtype)
    plan = load_plan(run.plan)  # bad plans fail before the model is loaded
    check_plan_source(plan, run.model)
    ids = calibration_ids(run)  # the same data rules as `mcmoe-vl calibrate`; bad data fails before loading
    model = load_model(run.model, dtype=dtype, device=run.device)
    if plan.model_type and plan.model_type != getattr(model.config, "model_type", None):
        raise ValueError(f"the plan is for model type {plan.model_type!r} but {run.model} is "
                         f"{model.config.model_type!r}")
    check_token_ids(ids, model_vocab_size(model), where=run.data)
    batches = [{k: v.to(run.device) for k, v in b.items()} for b in batches_from_ids(ids, run.batch_size)]
    log.info("quantizing %s on %d sequences x %d tokens", run.model, ids.shape[0], ids.shape[1])
    from model_adapters import get_adapter

    adapter = get_adapter(model)
    report = quantize_model(model, plan, batches, run.quantize, adapter=adapter)
    return save_quantized(model, run.output, plan=plan, report=report, config=run.quantize, adapter=adapter)
