"""The suite file: models x compression recipes x tasks, with calibration and evaluation settings.

A suite is TOML or YAML; every table is a typed config with ``extra="forbid"``, so a misspelt key is an error that
names it. A minimal TOML suite::

    name = "tiny"
    seeds = [0]

    [calibration]
    data = "embedded:train"       # embedded:<split> | a text / token-ids file | hf:<dataset>[:<config>[:<split>]]
    num_sequences = 16
    seq_len = 128

    [[models]]
    name = "mixtral"
    checkpoint = "embedded/tiny_mixtral"   # a local directory, or a Hub id such as "mistralai/Mixtral-8x7B-v0.1"
    adapter = "mixtral"                    # the expected Hugging Face model_type (checked when loaded)

    [[recipes]]
    name = "16-bit"                        # no quant, no prune: the baseline

    [[recipes]]
    name = "PMQ 2.0"
    quant = { method = "pmq", target_bits = 2.0 }
    prune = { method = "odp", protect_ratio = 0.02 }

    [[tasks]]
    harness = "lm_eval"
    name = "embedded_cloze"
    num_fewshot = 0
    limit = 200

Recipes (METHOD.md sections 3-7; :mod:`mcmoe_vl.suite.recipe`): no ``quant`` is the 16-bit baseline;
``quant = {method = "uniform", target_bits = 2}`` is uniform n-bit GPTQ; any other allocator (pmq, pmq+, hessian,
fnorm, frequency, weight, random, block) allocates the ``target_bits`` average over the widths ``bits`` (default 1, 2,
3) and quantizes with GPTQ. ``quant`` takes every :class:`~mcmoe_vl.allocation.config.AllocationConfig` setting under
its own name, ``gptq`` the :class:`~mcmoe_vl.quant.model.QuantizeConfig` and ``plus`` the
:class:`~mcmoe_vl.allocation.plus.PlusConfig`; ``prune`` is an :class:`~mcmoe_vl.pruning.odp.ODPConfig` or an
:class:`~mcmoe_vl.pruning.otp.OTPConfig`, chosen by its ``method``. The recipe objects are these library configs, so a
stage receives exactly what the suite file says.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mcmoe_vl.io import slug  # noqa: F401  (file-system names of models and recipes; re-exported)
from mcmoe_vl.quant.qlinear import Runtime
from mcmoe_vl.quant.widths import check_widths

from .recipe import NAME_PATTERN, PruneConfig, QuantRecipe, RecipeSpec, check_name  # noqa: F401  (re-exported)

SUITE_FORMAT_VERSION = 2  # 2: recipes embed the library's configs (quant: method / target_bits / bits)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Harness(str, enum.Enum):
    LM_EVAL = "lm_eval"  # text tasks (EleutherAI lm-evaluation-harness)
    LMMS_EVAL = "lmms_eval"  # multimodal tasks (lmms-eval)


class ModelSpec(_Strict):
    """One model of the suite.

    ``checkpoint``: a local directory (relative paths are relative to the suite file's directory, then to the
    working directory) or a Hub id ``owner/name``. ``adapter``: the Hugging Face ``model_type`` the checkpoint
    must have (a registered adapter). ``harnesses``: which task harnesses apply (default: lm_eval for text models,
    lmms_eval for vision-language models). ``device_map``: "auto" shards a model larger than one device over all
    visible GPUs (accelerate); None loads on ``device``.
    """

    name: str
    checkpoint: str
    adapter: str
    harnesses: list[Harness] | None = None
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None
    max_memory: dict[str, str] | None = None  # with device_map: per-device limits, e.g. {"0": "70GiB", "1": "70GiB"}
    revision: str | None = None
    tokenizer: str | None = None  # default: the checkpoint's own
    max_length: int | None = Field(None, ge=8)  # context length for lm-eval (default: the model's)
    # Calibration data for this model instead of the suite's ``calibration.data``. Vision-language models also
    # take image+text samples: a JSONL file ({"text", "image", "answer"}) or ``embedded:vqa`` (the offline rendered
    # image questions, train split; their held-out split is the timed workload); text sources run text-only.
    calibration_data: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "model")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        valid = ("float32", "bfloat16", "float16")
        if v not in valid:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(valid)}")
        return v

    @property
    def is_vlm(self) -> bool:
        """The adapter's modality is vision-language (an unknown adapter: False here; preflight names it)."""
        from mcmoe_vl.registry import RegistryError
        from model_adapters import ADAPTERS
        from model_adapters.base import Modality

        try:
            return ADAPTERS.get(self.adapter).modality is Modality.VISION_LANGUAGE
        except RegistryError:
            return False

    @property
    def resolved_harnesses(self) -> list[Harness]:
        if self.harnesses is not None:
            return list(self.harnesses)
        return [Harness.LMMS_EVAL] if self.is_vlm else [Harness.LM_EVAL]


class TaskSpec(_Strict):
    """One task of one harness. ``metric``: the number the report shows (default: the task's first of acc_norm,
    acc, exact_match, word_perplexity...). ``limit``: examples per task (None: all). ``id``: the key of the task in
    the results (default: ``name``); give one to run a task twice, e.g. MMLU zero-shot and ``id = "mmlu_5shot"``
    with ``num_fewshot = 5``."""

    harness: Harness
    name: str
    id: str | None = None
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1)
    metric: str | None = None
    label: str | None = None  # column title in the report (default: the task name)
    models: list[str] | None = None  # restrict to these model names

    @property
    def key(self) -> str:
        return self.id or self.name


class CalibrationSpec(_Strict):
    """Calibration data and what the pass measures (METHOD.md sections 1-2).

    ``data``: ``embedded:<split>`` (the embedded corpora, :func:`mcmoe_vl.data.embedded_texts`), a text or token-ids file, or
    ``hf:<dataset>[:<config>[:<split>]]`` (the paper: ``hf:allenai/c4:en:train``; needs the Hub).
    """

    data: str = "embedded:train"
    num_sequences: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=1)
    batch_size: int = Field(1, ge=1)
    eps_bits: list[int] = Field(default_factory=lambda: [1, 2, 3])
    min_tokens: int = Field(16, ge=0)  # also the GPTQ and pmq+ fallback threshold of recipes that do not set it
    text_field: str = "text"  # hf: datasets

    @field_validator("eps_bits")
    @classmethod
    def _eps_bits(cls, v: list[int]) -> list[int]:
        check_widths(v, where="calibration.eps_bits")
        return v


class EvaluationSpec(_Strict):
    """How tasks run.

    ``runtime``: fake-quant or packed weights. ``lm_eval_include`` / ``lmms_eval_include``: task directories
    (relative to the suite file) searched before the harness's own tasks; ``include_default_tasks``: also index
    the harness's built-in tasks (needs the Hub for their data). ``speed_tokens``: tokens of the fixed prefill
    workload timed for the speed-up (0: not measured), best of ``speed_repeats`` passes; ``speed_alternate``: the
    original model is timed in alternation with each compressed one.
    """

    batch_size: int = Field(8, ge=1)
    runtime: Runtime = Runtime.FAKE
    lm_eval_include: list[str] = Field(default_factory=list)
    lmms_eval_include: list[str] = Field(default_factory=list)
    include_default_tasks: bool = False
    speed_tokens: int = Field(2048, ge=0)
    speed_seq_len: int = Field(256, ge=8)
    speed_repeats: int = Field(3, ge=1)
    # Runtime of quantized models while the speed workload is timed (None: the evaluation runtime). Packed is
    # the model at its true size, which is what a speed-up should describe; scores do not depend on it.
    speed_runtime: Runtime | None = Runtime.PACKED
    # Time the original model in alternation with each compressed one (needs both in memory at once); False: the
    # report divides by the baseline row's speed, measured at another time.
    speed_alternate: bool = True
    bootstrap_iters: int = Field(0, ge=0)


class ReportSpec(_Strict):
    """Where the report goes, which rows are compared, and at what confidence.

    ``baseline``: the reference row of the Δ column and of the first paired comparison (default: the 16-bit
    recipe). ``compare_to``: a second recipe every compressed row is compared with by the paired test (default, per
    row: the same quantization without pruning for a pruned recipe, else the uniform recipe at the same bits, where
    there is one). ``confidence``: level of every interval and of the significance marks. ``bootstrap``: resamples
    of the paired and perplexity bootstraps (their seeds are fixed, so a report is reproducible to the byte).
    """

    output_dir: str | None = None  # default reports/<suite name>
    baseline: str | None = None
    compare_to: str | None = None
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    bootstrap: int = Field(2000, ge=100)
    heatmaps: bool = True


class Suite(_Strict):
    """A whole suite file (see the module docstring)."""

    format_version: int = SUITE_FORMAT_VERSION
    name: str
    description: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0])
    run_dir: str | None = None  # default runs/<suite name>
    # torch intra-op threads for every stage (None: torch's default). On a small shared CPU, 1 avoids the
    # oversubscription that makes small kernels orders of magnitude slower.
    torch_threads: int | None = Field(None, ge=1)
    models: list[ModelSpec] = Field(min_length=1)
    recipes: list[RecipeSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "suite")

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SUITE_FORMAT_VERSION:
            former = " (format 1 named the quant keys allocator / bits / bit_set, now method / target_bits / bits)" \
                if v == 1 else ""
            raise ValueError(f"suite format_version {v} is not supported (this version reads "
                             f"{SUITE_FORMAT_VERSION}){former}")
        return v

    @model_validator(mode="after")
    def _check(self) -> Suite:
        for what, names in (("model", [m.name for m in self.models]), ("recipe", [r.name for r in self.recipes])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names repeat: {dup}")
            slugs = [slug(n) for n in names]
            clash = sorted({n for n, s in zip(names, slugs) if slugs.count(s) > 1})
            if clash:
                raise ValueError(f"{what} names {clash} map to the same directory name; make them differ in letters")
        keys = [(t.harness.value, t.key) for t in self.tasks]
        dup_t = sorted({f"{h}:{n}" for h, n in keys if keys.count((h, n)) > 1})
        if dup_t:
            raise ValueError(f"tasks repeat: {dup_t}")
        model_names = {m.name for m in self.models}
        for owner, restrict in [(f"recipe {r.name!r}", r.models) for r in self.recipes] + \
                               [(f"task {t.name!r}", t.models) for t in self.tasks]:
            unknown = sorted(set(restrict or []) - model_names)
            if unknown:
                raise ValueError(f"{owner} names unknown models {unknown}; suite models: {sorted(model_names)}")
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed, e.g. seeds = [0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        if self.report.baseline is not None and self.report.baseline not in {r.name for r in self.recipes}:
            raise ValueError(f"report.baseline {self.report.baseline!r} is not a recipe of the suite")
        if self.report.compare_to is not None and self.report.compare_to not in {r.name for r in self.recipes}:
            raise ValueError(f"report.compare_to {self.report.compare_to!r} is not a recipe of the suite; recipes: "
                             f"{sorted(r.name for r in self.recipes)}")
        self.recipes = [r.with_min_tokens(self.calibration.min_tokens) for r in self.recipes]
        for m in self.models:
            if not any(self.tasks_for(m)):
                raise ValueError(f"model {m.name!r} has no task for its harnesses "
                                 f"{[h.value for h in m.resolved_harnesses]}")
        return self

    # -- views --------------------------------------------------------------------------------------------------
    def recipes_for(self, model: ModelSpec) -> list[RecipeSpec]:
        return [r for r in self.recipes if r.models is None or model.name in r.models]

    def seeds_for(self, recipe: RecipeSpec) -> list[int]:
        """The seeds a recipe runs with: its own, else the suite's."""
        return list(recipe.seeds) if recipe.seeds is not None else list(self.seeds)

    @property
    def all_seeds(self) -> list[int]:
        """Every seed some recipe runs with, in the suite's order, then the recipes' own."""
        extra = sorted({s for r in self.recipes for s in (r.seeds or [])} - set(self.seeds))
        return list(self.seeds) + extra

    def tasks_for(self, model: ModelSpec) -> list[TaskSpec]:
        hs = set(model.resolved_harnesses)
        return [t for t in self.tasks if t.harness in hs and (t.models is None or model.name in t.models)]

    @property
    def baseline_recipe(self) -> str | None:
        if self.report.baseline:
            return self.report.baseline
        return next((r.name for r in self.recipes if r.is_baseline), None)
