"""The results file: one (model, recipe, seed) evaluated on a suite's tasks.

The harnesses' own schema (lm-eval and lmms-eval share it) plus what compression needs::

    {
      "schema": "mcmoe_vl.results/1",
      "suite": "default", "model": "tiny-mixtral", "recipe": "PMQ 2.0", "seed": 0,
      "date": "2026-11-23T10:12:03Z",
      "results": {"embedded_cloze": {"alias": "embedded_cloze", "acc,none": 0.61, "acc_stderr,none": "N/A"}},
      "versions": {"embedded_cloze": 1.0}, "n-shot": {"embedded_cloze": 0},
      "higher_is_better": {"embedded_cloze": {"acc": true}}, "n-samples": {...},
      "tasks": {"embedded_cloze": {"harness": "lm_eval", "metric": "acc,none", "label": "cloze",
                                    "num_fewshot": 0, "limit": 200}},
      "compression": {... see CompressionBlock ...},
      "config": {... the resolved model, recipe, tasks, calibration and evaluation settings ...},
      "software": {"mcmoe_vl": "0.1.0", "lm_eval": "0.4.13", "torch": "...", "transformers": "..."},
      "samples": {"file": "<name>.samples.jsonl", "sha256": "...", "items": {"embedded_cloze": 400}},
      "provenance": {"lock": {"path": "requirements/lock.txt", "sha256": "..."}, "cpu": "...", "gpu": null,
                     "python": "3.11.7", "seeds": [0, 1, 2], "command": "mcmoe-vl run"}
    }

``results[task]["<metric>,<filter>"]`` is exactly what the harness returned. A report reads only these files
(:func:`load_results` refuses files of another schema with a message saying what the file looks like).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mcmoe_vl.io import read_json, write_json_atomic

from .compression import PruneInfo, QuantInfo
from .samples import SamplesRef

RESULTS_SCHEMA = "mcmoe_vl.results/1"


class ResultsSchemaError(ValueError):
    """A file that is not a results file of this schema version."""


class TaskInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    harness: str
    metric: str  # the key of results[task] the report shows, e.g. "acc,none"
    label: str
    num_fewshot: int | None = None
    limit: int | None = None


class LayerActivity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    top_k: int
    avg_active_experts: float


class Speed(BaseModel):
    """A fixed prefill workload timed on this model.

    ``reference_tokens_per_second``: the original (16-bit) model timed on the same workload in alternation with this
    one (same minutes, same machine load); the speed-up is ``tokens_per_second / reference_tokens_per_second``.
    Without it, the report divides by the baseline row's ``tokens_per_second``.
    """

    model_config = ConfigDict(extra="forbid")

    tokens: int
    seconds: float
    tokens_per_second: float
    workload: str
    device: str
    reference_tokens_per_second: float | None = None

    @property
    def speedup(self) -> float | None:
        r = self.reference_tokens_per_second
        return self.tokens_per_second / r if r else None


class Memory(BaseModel):
    """Memory measured in the run (not computed from bit widths).

    ``resident_bytes``: bytes of the storages held by the loaded model's parameters and buffers in ``runtime``
    (packed: the compressed model at its true size). ``peak_bytes``: the peak of ``peak_what`` while the harnesses
    evaluated it (the process's peak resident set on CPU, which includes the Python process and the harness; the
    peak allocated device memory on a GPU); None where the platform cannot measure it.
    """

    model_config = ConfigDict(extra="forbid")

    resident_bytes: int
    runtime: str
    peak_bytes: int | None = None
    peak_what: str | None = None


class CompressionBlock(BaseModel):
    """What was done to the model and what it costs (METHOD.md section 5).

    ``nominal_bits``: paper-style average over expert and attention linear weights, no scale/zero overhead (16 for
    the baseline). ``effective_bits``: every stored byte x 8 / parameters. ``size_bytes``: the compressed
    checkpoint's bytes on disk (the baseline: its parameters at 16 bits). ``activated_params_per_token``: measured
    from the routing actually used on the speed workload.
    """

    model_config = ConfigDict(extra="forbid")

    recipe: str
    baseline: bool
    quant: QuantInfo | None = None  # allocator, target, achieved, plan widths per layer, runtime, accounting
    prune: PruneInfo | None = None  # method, settings, fitted thresholds summary
    nominal_bits: float
    expert_nominal_bits: float | None = None
    effective_bits: float | None = None
    size_bytes: int | None = None
    resident_bytes: int | None = None  # the checkpoint engine's count at save time
    memory: Memory | None = None  # measured on the loaded model and during its evaluation
    total_params: int
    activated_params_per_token: float | None = None
    activated_params_reduction: float | None = None
    active_experts: list[LayerActivity] = Field(default_factory=list)
    speed: Speed | None = None
    artifacts: dict[str, str] = Field(default_factory=dict)  # name -> path relative to the results file


class ResultsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_id: str = Field(RESULTS_SCHEMA, alias="schema")
    suite: str
    model: str
    recipe: str
    seed: int
    date: str
    results: dict[str, dict[str, Any]]
    versions: dict[str, Any] = Field(default_factory=dict)
    n_shot: dict[str, Any] = Field(default_factory=dict, alias="n-shot")
    higher_is_better: dict[str, dict[str, bool]] = Field(default_factory=dict)
    n_samples: dict[str, Any] = Field(default_factory=dict, alias="n-samples")
    tasks: dict[str, TaskInfo]
    compression: CompressionBlock
    config: dict[str, Any] = Field(default_factory=dict)
    software: dict[str, str] = Field(default_factory=dict)
    samples: SamplesRef | None = None  # the per-item outputs beside this file (mcmoe_vl.evaluation.samples)
    provenance: dict[str, Any] = Field(default_factory=dict)  # lock hash, hardware, seeds, command (.provenance)

    def score(self, task: str) -> float | None:
        """The task's primary metric as a float (None when the harness did not produce it)."""
        info = self.tasks[task]
        v = self.results.get(task, {}).get(info.metric)
        return float(v) if isinstance(v, int | float) else None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def save_results(results: ResultsFile, path: str | os.PathLike[str]) -> Path:
    return write_json_atomic(path, results.to_json())


def load_results(path: str | os.PathLike[str]) -> ResultsFile:
    """Read and validate a results file; any other JSON is refused with what it looks like."""
    data = read_json(path, what="results file")
    if not isinstance(data, dict):
        raise ResultsSchemaError(f"{path}: not a results file (top level is {type(data).__name__}, not an object)")
    schema = data.get("schema")
    if schema != RESULTS_SCHEMA:
        if schema is None and "results" in data and "compression" not in data:
            what = "a plain lm-eval / lmms-eval output without the compression block"
        elif schema is None:
            what = "a JSON file without a 'schema' key"
        else:
            what = f"schema {schema!r}"
        raise ResultsSchemaError(f"{path}: expected a results file of schema {RESULTS_SCHEMA!r}, found {what}; "
                                 f"results files are written by `mcmoe-vl run`")
    try:
        res = ResultsFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ResultsSchemaError(f"{path}: malformed results file at {loc}: {first['msg']}") from None
    missing = sorted(set(res.tasks) - set(res.results))
    if missing:
        raise ResultsSchemaError(f"{path}: tasks {missing} are declared but have no results")
    return res


# Metrics the report prefers when a task does not name one, in order.
PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "word_perplexity", "perplexity", "byte_perplexity",
                     "bits_per_byte", "f1")


def primary_metric(task_results: dict[str, Any], requested: str | None = None) -> str:
    """The ``"<metric>,<filter>"`` key to show for one task's harness results."""
    keys = [k for k in task_results if "," in k and "_stderr" not in k.split(",", 1)[0]]
    if requested:
        if requested in task_results:
            return requested
        match = [k for k in keys if k.split(",", 1)[0] == requested]
        if match:
            return sorted(match)[0]
        raise ValueError(f"metric {requested!r} not in the task's results (has {sorted(keys)})")
    for m in PREFERRED_METRICS:
        match = sorted(k for k in keys if k.split(",", 1)[0] == m)
        if match:
            return match[0]
    numeric = sorted(k for k in keys if isinstance(task_results[k], int | float))
    if not numeric:
        raise ValueError(f"no numeric metric in the task's results (has {sorted(task_results)})")
    return numeric[0]
