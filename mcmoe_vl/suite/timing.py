"""Timing and memory of a compressed model: the fixed prefill workload timed for the speed-up (with the activated
experts counted on it) and the bytes the loaded model holds."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from . import stages


def measure(model: nn.Module, iface: Any, work: list[dict[str, torch.Tensor]], *, device: str,
            counts: tuple[dict[int, int], int], repeats: int = 3, reference: nn.Module | None = None
            ) -> tuple[Any, Any]:
    """Time a fixed prefill workload and count the experts actually computed on it.

    One warm-up batch, then the whole workload ``repeats`` times with the routing the evaluation uses (pruning rules
    installed on ``iface``); the fastest pass is kept (the least disturbed by other processes). With ``reference``
    (the original model), its passes alternate with the model's, so both are timed under the same machine load.
    Activated experts are counted on the first pass, as parameters of the original model (``counts`` from
    :func:`original_counts`). Returns (Speed, ActivationReport).
    """
    from mcmoe_vl.moe import ExpertInterface
    from mcmoe_vl.evaluation.results import Speed
    from mcmoe_vl.pruning.accounting import ActivationMeter

    tokens = sum(int(b["attention_mask"].sum()) for b in work)
    sync = torch.cuda.synchronize if torch.cuda.is_available() and device.startswith("cuda") else (lambda: None)

    def one_pass(m: nn.Module, meter: Any = None) -> float:
        sync()
        t0 = time.perf_counter()
        for b in work:
            if meter is not None:
                meter.token_mask = b["attention_mask"]
            m(**b)
        sync()
        return time.perf_counter() - t0

    best, best_ref = math.inf, math.inf
    report = None
    with torch.no_grad(), (ExpertInterface(reference, iface.adapter) if reference is not None else _null()):
        model(**work[0])  # warm-up (allocations, kernels); not timed, not counted
        if reference is not None:
            reference(**work[0])
        for rep in range(max(1, repeats)):
            meter = None
            if rep == 0:
                meter = ActivationMeter(iface, expert_params=counts[0])
                meter.always_active = counts[1]
                meter.attach()
            best = min(best, one_pass(model, meter))
            if meter is not None:
                meter.detach()
                report = meter.report()
            if reference is not None:
                best_ref = min(best_ref, one_pass(reference))
    speed = Speed(tokens=tokens, seconds=best, tokens_per_second=tokens / best if best > 0 else math.inf,
                  workload=f"prefill, {len(work)} batches of {tuple(work[0]['input_ids'].shape)} tokens, "
                           f"best of {max(1, repeats)}",
                  device=device,
                  reference_tokens_per_second=tokens / best_ref if reference is not None and best_ref > 0 else None)
    return speed, report


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def resident_bytes_in(model: torch.nn.Module, runtime: str | None, eval_runtime: str) -> int:
    """Bytes the loaded model holds in ``runtime`` (packed: its true size), measured on its storages."""
    from mcmoe_vl.quant.accounting import resident_bytes

    if runtime is None or runtime == eval_runtime:
        return resident_bytes(model, include_caches=True)
    stages.set_runtime(model, runtime)
    try:
        return resident_bytes(model, include_caches=True)
    finally:
        stages.set_runtime(model, eval_runtime)
