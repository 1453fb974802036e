"""Text tasks through lm-eval with the (compressed) model handed over in memory.

::

    out = evaluate_lm_eval(model, tokenizer, [TaskRequest("embedded_cloze", num_fewshot=0, limit=200)],
                           include_paths=["tasks/lm_eval"])
    out["results"]["embedded_cloze"]["acc,none"]

The model is wrapped in lm-eval's ``HFLM`` (which accepts a model instance), so whatever was done to it (fake-quant or
packed experts, pruning overrides installed on its MoE blocks) is what lm-eval measures. Each task is evaluated in
its own ``simple_evaluate`` call (tasks may differ in few-shot and limit) and the outputs are merged into one dict of
lm-eval's schema: ``results``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, plus ``samples``: the
per-item outputs (``log_samples``) compacted by :func:`mcmoe_vl.evaluation.samples.compact_samples`, from which the
report computes standard errors and paired comparisons. Metrics are lm-eval's own; nothing is re-implemented here.

Task lookup: ``TaskManager(include_defaults=False, include_path=...)`` indexes only the given directories (indexing
lm-eval's ~10k built-in tasks costs about 17 s and their data needs the Hub); ``include_defaults=True`` adds them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .samples import compact_samples

log = logging.getLogger(__name__)

HARNESS_KEYS = ("results", "versions", "n-shot", "higher_is_better", "n-samples")


@contextlib.contextmanager
def single_process_view() -> Iterator[None]:
    """Make the harness treat this process as a single-process run.

    Under ``accelerate launch`` / ``torchrun`` the suite runner splits *recipes* over processes and each process
    evaluates its own in-memory model alone; the harnesses, seeing ``LOCAL_RANK != 0``, would otherwise return no
    results from every process but the first of a node. The runner's process group is hidden too
    (``torch.distributed.is_initialized()`` answers False inside): lmms-eval's evaluator calls ``barrier`` and
    ``all_gather`` whenever a group exists, which would wait forever for processes evaluating other recipes.
    """
    import torch.distributed as dist

    saved = {k: os.environ.pop(k, None) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    is_initialized = dist.is_initialized
    dist.is_initialized = lambda: False  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.is_initialized = is_initialized  # type: ignore[assignment]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class TaskRequest:
    """One harness task; ``key`` (default ``name``) is its name in the merged output, so a task can run twice
    (e.g. zero- and five-shot): entries of a renamed run are stored as ``key`` and ``key/<subtask>``."""

    name: str
    num_fewshot: int | None = None
    limit: int | None = None
    key: str | None = None

    @property
    def out_key(self) -> str:
        return self.key or self.name


def merge_output(merged: dict[str, Any], out: dict[str, Any], req: TaskRequest, harness: str) -> None:
    """Fold one ``simple_evaluate`` output into ``merged`` under the request's key (see :class:`TaskRequest`)."""
    results = dict(out.get("results") or {})
    for name, agg in (out.get("groups") or {}).items():
        results.setdefault(name, agg)
    if req.name not in results:
        raise RuntimeError(f"{harness} returned no results for task {req.name!r} (got {sorted(results)})")

    def rename(k: str) -> str:
        if req.key is None or req.key == req.name:
            return k
        return req.key if k == req.name else f"{req.key}/{k}"

    for section in HARNESS_KEYS:
        src = results if section == "results" else (out.get(section) or {})
        for k, v in src.items():
            merged[section][rename(k)] = _jsonable(v) if section == "results" else v
    hib = out.get("higher_is_better") or {}
    for k, logged in (out.get("samples") or {}).items():
        metrics = hib.get(k) or {}
        merged.setdefault("samples", {})[rename(k)] = compact_samples(logged, metrics, rename(k))


def _task_manager(include_paths: Sequence[str | os.PathLike[str]], include_defaults: bool) -> Any:
    import lm_eval.models  # noqa: F401 - keeps lm-eval's built-in model names registered (see module docs)
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p)) for p in include_paths]
    return TaskManager(include_defaults=include_defaults, include_path=paths or None)


def wrap_model(model: nn.Module, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None) -> Any:
    """lm-eval's ``HFLM`` around an in-memory model (no copy, no reload)."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size, "device": device}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(**kwargs)


def evaluate_lm_eval(
    model: nn.Module | Any,
    tokenizer: Any,
    tasks: Sequence[TaskRequest],
    *,
    include_paths: Sequence[str | os.PathLike[str]] = (),
    include_defaults: bool = False,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
    bootstrap_iters: int = 0,
    on_task: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``tasks`` on ``model`` (an ``nn.Module`` or an lm-eval ``LM``) and return the merged harness output.

    ``on_task(name)`` is called before each task (progress reporting). Seeds: lm-eval's python, numpy, torch and
    few-shot seeds are all set to ``seed``.
    """
    import lm_eval

    if not tasks:
        raise ValueError("no lm-eval tasks to evaluate")
    lm = model if not isinstance(model, nn.Module) else wrap_model(model, tokenizer, batch_size=batch_size,
                                                                   max_length=max_length)
    tm = _task_manager(include_paths, include_defaults)
    merged: dict[str, Any] = {k: {} for k in HARNESS_KEYS}
    for req in tasks:
        if on_task is not None:
            on_task(req.name)
        with single_process_view():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[req.name], num_fewshot=req.num_fewshot, limit=req.limit, task_manager=tm,
                log_samples=True, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed, verbosity="WARNING",
            )
        if out is None:  # a non-zero rank of a distributed run
            continue
        merge_output(merged, out, req, "lm-eval")
    return merged


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, int | float | str | bool) or v is None:
            out[k] = v
        elif hasattr(v, "item"):
            out[k] = v.item()
        else:
            out[k] = str(v)
    return out
