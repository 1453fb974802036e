"""Multimodal tasks through lmms-eval, with the (compressed) vision-language model handed over in memory.

::

    out = evaluate_lmms_eval(model, processor, [TaskRequest("embedded_colour", limit=50)],
                             include_paths=["tasks/lmms_eval"])

The model is served by its family's lmms-eval model (:meth:`model_adapters.base.MoEAdapter.lmms_model`, e.g. the
DeepSeek-VL2 port's :class:`model_adapters.deepseek_vl2.lmms_model.DeepseekVL2LMMS`), constructed around the
in-memory instance: lmms-eval 0.7 finds a model by name only in its own registry, an instance is always accepted. The output is merged
into lmms-eval's (= lm-eval's) schema exactly as :func:`mcmoe_vl.evaluation.lm_eval_backend.evaluate_lm_eval` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .lm_eval_backend import HARNESS_KEYS, TaskRequest, merge_output, single_process_view

log = logging.getLogger(__name__)


class LmmsEvalUnavailable(RuntimeError):
    """lmms-eval is not installed here (the one optional dependency; any other import error is a bug)."""


def lmms_model(model: Any, processor: Any, *, adapter: Any = None, batch_size: int = 1, max_new_tokens: int = 32
               ) -> Any:
    """The lmms-eval model instance around an in-memory vision-language model, from its adapter (default: the
    model's own, by ``model.config.model_type``)."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError as exc:
        raise LmmsEvalUnavailable(f"lmms-eval is not installed ({exc}); scripts/setup.sh installs it") from None
    if adapter is None:
        from model_adapters import get_adapter

        adapter = get_adapter(model)
    return adapter.lmms_model(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)


def evaluate_lmms_eval(
    model: Any,
    processor: Any,
    tasks: Sequence[TaskRequest],
    *,
    adapter: Any = None,
    include_paths: Sequence[str | os.PathLike[str]] = (),
    include_defaults: bool = False,
    batch_size: int = 1,
    max_new_tokens: int = 32,
    seed: int = 0,
    bootstrap_iters: int = 0,
    on_task: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``tasks`` with lmms-eval; ``model`` is a vision-language model whose ``adapter`` (default: its
    own) serves it to lmms-eval, or an lmms-eval model instance."""
    try:
        from lmms_eval import evaluator
        from lmms_eval.api.model import lmms
        from lmms_eval.tasks import TaskManager
    except ImportError as exc:
        raise LmmsEvalUnavailable(f"lmms-eval is not installed ({exc}); scripts/setup.sh installs it") from None
    if not tasks:
        raise ValueError("no lmms-eval tasks to evaluate")
    lm = model if isinstance(model, lmms) else lmms_model(model, processor, adapter=adapter, batch_size=batch_size,
                                                          max_new_tokens=max_new_tokens)
    tm = TaskManager(verbosity="WARNING", include_path=[str(Path(p)) for p in include_paths] or None,
                     include_defaults=include_defaults)
    merged: dict[str, Any] = {k: {} for k in HARNESS_KEYS}
    for req in tasks:
        if on_task is not None:
            on_task(req.name)
        with single_process_view():
            out = evaluator.simple_evaluate(
                model=lm, tasks=[req.name], num_fewshot=req.num_fewshot, limit=req.limit, task_manager=tm,
                log_samples=True, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed, verbosity="WARNING", batch_size=batch_size,
            )
        if out is None:
            continue
        merge_output(merged, out, req, "lmms-eval")
    return merged
