"""The evaluate stage on one loaded model: pruning rules installed, the speed workload timed, the model's memory
measured, and every task run by its harness (lm-eval for text, lmms-eval served by the model's adapter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mcmoe_vl.evaluation.memory import PeakMemory
from mcmoe_vl.evaluation.results import Memory

from . import stages
from .context import ModelContext
from .schema import EvaluationSpec, Harness, TaskSpec
from .timing import measure, resident_bytes_in

Status = Callable[..., None]  # status(stage, task=None): progress line


def evaluate_model(model: torch.nn.Module, ctx: ModelContext, *, quantized: bool, artifact: Any,
                   tasks: list[TaskSpec], ev: EvaluationSpec, include: Callable[[Harness], list[str]],
                   status: Status) -> tuple[dict[str, Any], Any, Any, Memory]:
    """(merged harness output, speed, activity, memory) of ``model`` with the pruning ``artifact`` applied."""
    from mcmoe_vl.moe import ExpertInterface
    from mcmoe_vl.pruning.artifact import apply_pruning

    was_training = model.training
    model.eval()
    with ExpertInterface(model, ctx.adapter) as iface:
        rule = apply_pruning(iface, artifact) if artifact is not None else None
        try:
            speed, activity = timed_speed(model, iface, ctx, quantized=quantized, ev=ev, status=status) \
                if ev.speed_tokens > 0 else (None, None)
            mem_rt = (ev.speed_runtime or ev.runtime).value if quantized else "16-bit"
            resident = resident_bytes_in(model, mem_rt if quantized else None, ev.runtime.value)
            with PeakMemory(str(ctx.device)) as peak:
                merged = run_harnesses(model, ctx, tasks, ev, include, status)
        finally:
            if rule is not None:
                rule.remove()
    model.train(was_training)
    memory = Memory(resident_bytes=resident, runtime=mem_rt, peak_bytes=peak.bytes, peak_what=peak.what)
    return merged, speed, activity, memory


def timed_speed(model: torch.nn.Module, iface: Any, ctx: ModelContext, *, quantized: bool, ev: EvaluationSpec,
                status: Status) -> tuple[Any, Any]:
    """Speed and activity on the timed workload, in the speed runtime (packed: the model at its true size)."""
    status("measure speed")
    ref = ctx.model if ev.speed_alternate and model is not ctx.model else None
    timed_rt = ev.speed_runtime.value if ev.speed_runtime is not None else ev.runtime.value
    switch = quantized and timed_rt != ev.runtime.value
    if switch:
        stages.set_runtime(model, timed_rt)
    try:
        speed, activity = measure(model, iface, ctx.workload(), device=str(ctx.device), counts=ctx.counts(),
                                  repeats=ev.speed_repeats, reference=ref)
    finally:
        if switch:
            stages.set_runtime(model, ev.runtime.value)
    if quantized:
        speed = speed.model_copy(update={"workload": f"{speed.workload}, {timed_rt} runtime"})
    return speed, activity


def run_harnesses(model: torch.nn.Module, ctx: ModelContext, tasks: list[TaskSpec], ev: EvaluationSpec,
                  include: Callable[[Harness], list[str]], status: Status) -> dict[str, Any]:
    """Every task through its harness, merged into one lm-eval-schema output."""
    from mcmoe_vl.evaluation.lm_eval_backend import TaskRequest, evaluate_lm_eval

    merged: dict[str, Any] = {}
    for harness in Harness:
        reqs = [TaskRequest(t.name, t.num_fewshot, t.limit, t.id) for t in tasks if t.harness is harness]
        if not reqs:
            continue

        def on_task(name: str, _h: str = harness.value) -> None:
            status(f"evaluate ({_h})", name)

        common = dict(include_paths=include(harness), include_defaults=ev.include_default_tasks,
                      batch_size=ev.batch_size, seed=ctx.seed, bootstrap_iters=ev.bootstrap_iters, on_task=on_task)
        if harness is Harness.LM_EVAL:
            out = evaluate_lm_eval(model, ctx.tokenizer, reqs, max_length=ctx.spec.max_length, **common)
        else:
            from mcmoe_vl.evaluation.lmms_eval_backend import evaluate_lmms_eval

            out = evaluate_lmms_eval(model, ctx.adapter.load_processor(ctx.tokenizer, model), reqs,
                                     adapter=ctx.adapter, **common)
        for k, v in out.items():
            merged.setdefault(k, {}).update(v)
    return merged
