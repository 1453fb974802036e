"""Run a suite: calibrate -> allocate -> quantize -> prune -> evaluate -> report, every stage cached by its inputs.

::

    summary = run_suite(load_suite("suites/default.toml"))
    summary.report        # reports/default/report.md

Layout of a run directory (``runs/<suite>/`` unless the suite or the caller names another)::

    suite.resolved.json                 the suite with every default filled in
    calibrate/<key>/stats.json          calibration statistics (+ significance.png)
    allocate/<key>/plan.json            bit plan (+ allocation.png)
    quantize/<key>/...                  packed checkpoint and its manifest
    prune/<key>/pruning.json            ODP thresholds or OTP predictors
    evaluate/<key>/results.json         one (model, recipe, seed) in the results schema
    results/<model>/<recipe>-seed<k>.json   the results files the report reads
    results.stale/...                   results of recipes that failed or left the suite (moved aside, not read)

``<key>`` hashes the stage's inputs, including the keys of the stages before it (:mod:`.cache`), so a re-run does
only what changed and an interrupted run resumes; a stage directory without its completion record is redone.
Everything the suite asks for is checked first (:func:`.load.preflight`). Only the optional lmms-eval may be missing
(:class:`.stages.StageUnavailable`): its recipes are skipped with a note in the report; the others still run. Any other
import error is a bug and fails loudly.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mcmoe_vl.allocation.plan import BitPlan
from mcmoe_vl.evaluation.compression import QuantAccounting, QuantInfo
from mcmoe_vl.evaluation.results import (
    CompressionBlock,
    LayerActivity,
    Memory,
    ResultsFile,
    TaskInfo,
    load_results,
    primary_metric,
    save_results,
)
from mcmoe_vl.evaluation.memory import PeakMemory
from mcmoe_vl.evaluation.provenance import provenance
from mcmoe_vl.evaluation.samples import samples_path_for, write_samples
from mcmoe_vl.io import check_output_outside, read_json, write_bytes_atomic, write_json_atomic
from model_adapters import get_adapter

from . import stages
from .cache import StageCache, checkpoint_fingerprint, stage_key
from .load import LoadedSuite, SuiteError, include_dirs, is_image_source, preflight
from .schema import Harness, ModelSpec, RecipeSpec, Suite, TaskSpec, slug

log = logging.getLogger(__name__)

# Models with more parameter bytes than this are reloaded for each recipe instead of copied in memory.
COPY_LIMIT_BYTES = 4 << 30


@dataclass
class RunSummary:
    run_dir: Path
    report: Path | None
    results: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)  # recipes whose stage was unavailable
    kept_report: Path | None = None  # an existing report left in place because the run was incomplete
    reused: dict[str, int] = field(default_factory=dict)  # stage -> cache hits
    computed: dict[str, int] = field(default_factory=dict)  # stage -> runs


def software_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("mcmoe_vl", "lm_eval", "lmms_eval", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-")) if pkg != "mcmoe_vl" else metadata.version(pkg)
        except metadata.PackageNotFoundError:
            try:
                out[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                continue
    return out


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _ModelContext:
    """One model of the suite for one seed: the pristine model, tokenizer and data, loaded on first use."""

    def __init__(self, runner: SuiteRunner, spec: ModelSpec, location: str, is_local: bool, seed: int) -> None:
        self.r, self.spec, self.location, self.is_local, self.seed = runner, spec, location, is_local, seed
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._calib: list[dict[str, torch.Tensor]] | None = None
        self._work: list[dict[str, torch.Tensor]] | None = None
        self._counts: tuple[dict[int, int], int] | None = None
        self.fingerprint = (checkpoint_fingerprint(Path(location)) if is_local
                            else {"hub": location, "revision": spec.revision})
        self.adapter = get_adapter(spec.adapter)  # resolved once; every stage asks it, none names a family

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            log.info("loading %s from %s", self.spec.name, self.location)
            self._model = stages.load_model(self.spec, self.location, self.is_local, self.adapter)
        return self._model

    def fresh_model(self) -> torch.nn.Module:
        """A copy of the original model that a stage may modify."""
        base = self.model
        nbytes = sum(p.numel() * p.element_size() for p in base.parameters())
        if self.spec.device_map is None and nbytes <= COPY_LIMIT_BYTES:
            return copy.deepcopy(base)
        return stages.load_model(self.spec, self.location, self.is_local, self.adapter)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = stages.load_tokenizer(self.spec, self.location, self.adapter)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return stages.model_device(self.model)

    @property
    def calibration_source(self) -> str:
        return self.spec.calibration_data or self.r.suite.calibration.data

    def processor(self) -> Any:
        return self.adapter.load_processor(self.tokenizer, self.model)

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._calib is None:
            c = self.r.suite.calibration
            if is_image_source(self.calibration_source):
                samples = stages.vlm_samples(self.calibration_source, split="train", num=c.num_sequences,
                                             seed=self.seed, base=self.r.loaded.base_dir)
                self._calib = stages.vlm_batches(self.adapter, self.processor(), samples, c.batch_size, self.device)
            else:
                text = stages.source_text(self.calibration_source, base=self.r.loaded.base_dir,
                                          text_field=c.text_field)
                ids = stages.token_windows(self.tokenizer, text, seq_len=c.seq_len, num=c.num_sequences,
                                           seed=self.seed)
                self._calib = stages.batches(ids, c.batch_size, self.device)
        return self._calib

    def selection_batches(self) -> list[dict[str, torch.Tensor]]:
        """pmq+'s selection split: other windows of the calibration text (seed 20000 + seed), never evaluation data."""
        c = self.r.suite.calibration
        if is_image_source(self.calibration_source):
            raise ValueError(f"{self.spec.name}: pmq+ in suites needs a text calibration source for its selection "
                             f"split, got {self.calibration_source!r}; use allocate_plus from Python for images")
        text = stages.source_text(self.calibration_source, base=self.r.loaded.base_dir, text_field=c.text_field)
        ids = stages.token_windows(self.tokenizer, text, seq_len=c.seq_len, num=max(8, c.num_sequences // 2),
                                   seed=20_000 + self.seed)
        return stages.batches(ids, c.batch_size, self.device)

    def counts(self) -> tuple[dict[int, int], int]:
        """Parameter counts of the original model (activated parameters are counted in original weights)."""
        if self._counts is None:
            self._counts = stages.original_counts(self.model)
        return self._counts

    def workload(self) -> list[dict[str, torch.Tensor]]:
        """The fixed prefill workload timed for the speed-up (held-out text or image questions)."""
        if self._work is None:
            c, ev = self.r.suite.calibration, self.r.suite.evaluation
            if is_image_source(self.calibration_source):
                n = max(1, ev.speed_tokens // ev.speed_seq_len)
                samples = stages.vlm_samples(self.calibration_source, split="heldout", num=n, seed=10_000 + self.seed,
                                             base=self.r.loaded.base_dir)
                self._work = stages.vlm_batches(self.adapter, self.processor(), samples, ev.batch_size, self.device)
            else:
                text = stages.source_text(stages.heldout_source(self.calibration_source), base=self.r.loaded.base_dir,
                                          text_field=c.text_field)
                n = max(1, -(-ev.speed_tokens // ev.speed_seq_len))
                ids = stages.token_windows(self.tokenizer, text, seq_len=ev.speed_seq_len, num=n,
                                           seed=10_000 + self.seed)
                self._work = stages.batches(ids, ev.batch_size, self.device)
        return self._work


class SuiteRunner:
    """Runs the stages of one suite into one run directory (see the module docstring)."""

    def __init__(self, loaded: LoadedSuite, *, run_dir: str | os.PathLike[str] | None = None,
                 report_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                 command: str | None = None, overwrite_report: bool = False) -> None:
        self.loaded = loaded
        self.overwrite_report = overwrite_report
        self._subset = False
        self.suite: Suite = loaded.suite
        self.run_dir = Path(run_dir or self.suite.run_dir or Path("runs") / slug(self.suite.name))
        self.report_dir = Path(report_dir or self.suite.report.output_dir or Path("reports") / slug(self.suite.name))
        self.cache = StageCache(self.run_dir)
        self.progress = progress
        self.command = command
        self.summary = RunSummary(run_dir=self.run_dir, report=None)
        self._bar: Any = None
        self._version = software_versions().get("mcmoe_vl", "dev")

    # -- bookkeeping ------------------------------------------------------------------------------------------------
    def _status(self, stage: str, ctx: _ModelContext, recipe: RecipeSpec, task: str | None = None) -> None:
        text = f"{stage} | {ctx.spec.name} | {recipe.name}" + (f" | {task}" if task else "")
        if self._bar is not None:
            self._bar.set_description_str(text)
        log.info("%s", text)

    def _hit(self, stage: str) -> None:
        self.summary.reused[stage] = self.summary.reused.get(stage, 0) + 1

    def _miss(self, stage: str) -> None:
        self.summary.computed[stage] = self.summary.computed.get(stage, 0) + 1

    # -- keys -------------------------------------------------------------------------------------------------------
    def _calib_inputs(self, ctx: _ModelContext, recipe: RecipeSpec) -> dict[str, Any]:
        group = recipe.quant.group_size if recipe.quant else 128
        return {"version": self._version, "model": ctx.fingerprint, "dtype": ctx.spec.dtype,
                "calibration": self.suite.calibration.model_dump(mode="json"), "data": ctx.calibration_source,
                "seed": ctx.seed, "group_size": group}

    def keys(self, ctx: _ModelContext, recipe: RecipeSpec) -> dict[str, str | None]:
        """Every stage key of a recipe, computed from inputs only (no stage is run)."""
        k: dict[str, str | None] = {"calibrate": None, "allocate": None, "quantize": None, "prune": None}
        if recipe.quant is not None or recipe.prune is not None:
            k["calibrate"] = stage_key("calibrate", self._calib_inputs(ctx, recipe))
        if recipe.quant is not None:
            q = recipe.quant
            alloc = {f: v for f, v in q.model_dump(mode="json").items() if f != "gptq"}
            k["allocate"] = stage_key("allocate", {"calibrate": k["calibrate"], "quant": alloc, "seed": ctx.seed,
                                                   "version": self._version})
            k["quantize"] = stage_key("quantize", {"allocate": k["allocate"], "calibrate": k["calibrate"],
                                                   "quant": q.model_dump(mode="json"), "version": self._version,
                                                   "checkpoint_format": _checkpoint_format()})
        if recipe.prune is not None:
            k["prune"] = stage_key("prune", {"base": k["quantize"] or ctx.fingerprint, "calibrate": k["calibrate"],
                                             "prune": recipe.prune.model_dump(mode="json"), "seed": ctx.seed,
                                             "version": self._version})
        k["evaluate"] = stage_key("evaluate", self._eval_inputs(ctx, recipe, k))
        return k

    def _eval_inputs(self, ctx: _ModelContext, recipe: RecipeSpec, k: dict[str, str | None]) -> dict[str, Any]:
        ev = self.suite.evaluation.model_dump(mode="json")
        if recipe.quant is None:
            ev.pop("runtime")  # the 16-bit model has no quantized runtime
        return {"model": ctx.fingerprint, "model_spec": ctx.spec.model_dump(mode="json"),
                "recipe": recipe.model_dump(mode="json"), "quantize": k["quantize"], "prune": k["prune"],
                "tasks": [t.model_dump(mode="json") for t in self.suite.tasks_for(ctx.spec)], "evaluation": ev,
                "seed": ctx.seed, "software": software_versions()}

    # -- stages -----------------------------------------------------------------------------------------------------
    def calibrate(self, ctx: _ModelContext, recipe: RecipeSpec, key: str) -> tuple[Any, Path]:
        with self.cache.lock("calibrate", key):
            return self._calibrate(ctx, recipe, key)

    def allocate(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None], stats: Any) -> Path:
        with self.cache.lock("allocate", str(keys["allocate"])):
            return self._allocate(ctx, recipe, keys, stats)

    def quantize(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None], plan_dir: Path
                 ) -> tuple[Path, dict[str, Any]]:
        with self.cache.lock("quantize", str(keys["quantize"])):
            return self._quantize(ctx, recipe, keys, plan_dir)

    def prune(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None], model: torch.nn.Module
              ) -> Any:
        with self.cache.lock("prune", str(keys["prune"])):
            return self._prune(ctx, recipe, keys, model)

    def evaluate(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None]) -> Path:
        with self.cache.lock("evaluate", str(keys["evaluate"])):
            return self._evaluate(ctx, recipe, keys)

    def _calibrate(self, ctx: _ModelContext, recipe: RecipeSpec, key: str) -> tuple[Any, Path]:
        from mcmoe_vl.calibration.stats import load_stats

        d = self.cache.dir("calibrate", key)
        if self.cache.lookup("calibrate", key) is not None:
            self._hit("calibrate")
            return load_stats(d / "stats.json"), d
        self._status("calibrate", ctx, recipe)
        if (d / "stage.json").exists():  # finished once, changed since: redone from scratch, nothing kept
            d = self.cache.begin("calibrate", key)
        # else not cleared: an interrupted pass resumes from its own partial file once the file proves intact
        d.mkdir(parents=True, exist_ok=True)
        group = recipe.quant.group_size if recipe.quant else 128
        stats = stages.calibrate(ctx.model, ctx.calibration_batches(), self.suite.calibration, group_size=group,
                                 output=d / "stats.json", model_name=ctx.spec.name,
                                 model_fingerprint=ctx.fingerprint.get("files", ctx.fingerprint),
                                 progress=self.progress)
        files = ["stats.json"]
        if self.suite.report.heatmaps:
            stages.significance_plot(stats, d / "significance.png")
            files.append("significance.png")
        self.cache.commit("calibrate", key, inputs=self._calib_inputs(ctx, recipe), files=files)
        self._miss("calibrate")
        return stats, d

    def _allocate(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None], stats: Any) -> Path:
        key = keys["allocate"]
        assert key is not None and recipe.quant is not None
        d = self.cache.dir("allocate", key)
        if self.cache.lookup("allocate", key) is not None:
            self._hit("allocate")
            return d
        self._status("allocate", ctx, recipe)
        d = self.cache.begin("allocate", key)
        stages.allocate(stats, recipe.quant, ctx.seed, plan_path=d / "plan.json", heatmap_path=d / "allocation.png",
                        title=f"{recipe.quant.allocator} allocation, {ctx.spec.name}, {recipe.quant.bits:g} bits",
                        plus_data=lambda: (ctx.model, ctx.calibration_batches(), ctx.selection_batches()))
        files = ["plan.json", "allocation.png"] + (["stats_gptq.json"] if recipe.quant.allocator == "pmq+" else [])
        self.cache.commit("allocate", key, inputs={"calibrate": keys["calibrate"], "recipe": recipe.name},
                          files=files)
        self._miss("allocate")
        return d

    def _quantize(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None], plan_dir: Path
                  ) -> tuple[Path, QuantAccounting]:
        key = keys["quantize"]
        assert key is not None and recipe.quant is not None
        d = self.cache.dir("quantize", key)
        rec = self.cache.lookup("quantize", key)
        if rec is not None:
            self._hit("quantize")
            return d / "checkpoint", QuantAccounting.model_validate(rec["info"])
        self._status("quantize", ctx, recipe)
        d = self.cache.begin("quantize", key)
        model = ctx.fresh_model()
        acct = stages.quantize(model, plan_dir / "plan.json", ctx.calibration_batches(), recipe.quant,
                               out_dir=d / "checkpoint", min_tokens=self.suite.calibration.min_tokens,
                               progress=self.progress)
        del model
        files = [p.relative_to(d).as_posix() for p in sorted((d / "checkpoint").rglob("*")) if p.is_file()]
        self.cache.commit("quantize", key, inputs={"allocate": keys["allocate"], "recipe": recipe.name}, files=files,
                          info=acct.model_dump(mode="json"))
        self._miss("quantize")
        return d / "checkpoint", acct

    def compressed_model(self, ctx: _ModelContext, recipe: RecipeSpec, ckpt: Path | None, *, runtime: str
                         ) -> torch.nn.Module:
        """The model the recipe evaluates: the original, or the quantized checkpoint in the requested runtime."""
        if ckpt is None:
            return ctx.model
        return stages.load_quantized(ctx.fresh_model(), ckpt, runtime)

    def _prune(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None], model: torch.nn.Module
               ) -> Any:
        from mcmoe_vl.pruning.artifact import load_pruning

        key = keys["prune"]
        assert key is not None and recipe.prune is not None
        d = self.cache.dir("prune", key)
        if self.cache.lookup("prune", key) is not None:
            self._hit("prune")
            return load_pruning(d / "pruning.json")
        self._status(f"prune ({recipe.prune.method.value})", ctx, recipe)
        d = self.cache.begin("prune", key)
        stages.fit_pruning(model, ctx.calibration_batches(), recipe.prune, seed=ctx.seed, out=d / "pruning.json",
                           progress=self.progress)
        files = [p.name for p in sorted(d.iterdir()) if p.is_file()]
        self.cache.commit("prune", key, inputs={"base": keys["quantize"], "recipe": recipe.name}, files=files)
        self._miss("prune")
        return load_pruning(d / "pruning.json")

    def _evaluate(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None]) -> Path:
        key = keys["evaluate"]
        assert key is not None
        d = self.cache.dir("evaluate", key)
        if self.cache.lookup("evaluate", key) is not None:
            self._hit("evaluate")
            return d / "results.json"
        tasks = self.suite.tasks_for(ctx.spec)
        if any(t.harness is Harness.LMMS_EVAL for t in tasks):
            _check_lmms_available()
        artifacts: dict[str, Path] = {}
        stats = None
        if keys["calibrate"] is not None:
            stats, cdir = self.calibrate(ctx, recipe, keys["calibrate"])
            if (cdir / "significance.png").is_file():
                artifacts["significance_heatmap"] = cdir / "significance.png"
        ckpt, acct = None, None
        if recipe.quant is not None:
            pdir = self.allocate(ctx, recipe, keys, stats)
            artifacts["allocation_heatmap"] = pdir / "allocation.png"
            ckpt, acct = self.quantize(ctx, recipe, keys, pdir)
        runtime = self.suite.evaluation.runtime.value
        model = self.compressed_model(ctx, recipe, ckpt, runtime=runtime)
        artifact = self.prune(ctx, recipe, keys, model) if recipe.prune is not None else None

        self._status("evaluate", ctx, recipe)
        results, speed, activity, memory = self._evaluate_model(ctx, recipe, model, artifact, tasks)
        if model is not ctx.model:
            del model
        d = self.cache.begin("evaluate", key)
        res = self._results_file(ctx, recipe, keys, results, tasks, speed, activity, acct, artifact, artifacts, d,
                                 plan_path=(self.cache.dir("allocate", keys["allocate"]) / "plan.json"
                                            if keys["allocate"] else None))
        res.compression.memory = memory
        res.samples = write_samples(samples_path_for(d / "results.json"), results.get("samples") or {})
        res.provenance = provenance(command=self.command, seeds=self.suite.seeds_for(recipe))
        save_results(res, d / "results.json")
        self.cache.commit("evaluate", key, inputs={"recipe": recipe.name, "model": ctx.spec.name, "seed": ctx.seed},
                          files=["results.json", res.samples.file])
        self._miss("evaluate")
        return d / "results.json"

    def _evaluate_model(self, ctx: _ModelContext, recipe: RecipeSpec, model: torch.nn.Module, artifact: Any,
                        tasks: list[TaskSpec]) -> tuple[dict[str, Any], Any, Any, Memory]:
        from mcmoe_vl.moe import ExpertInterface
        from mcmoe_vl.evaluation.lm_eval_backend import TaskRequest, evaluate_lm_eval
        from mcmoe_vl.pruning.artifact import apply_pruning

        ev = self.suite.evaluation
        merged: dict[str, Any] = {}
        was_training = model.training
        model.eval()
        with ExpertInterface(model) as iface:
            rule = apply_pruning(iface, artifact) if artifact is not None else None
            try:
                speed, activity = (None, None)
                if ev.speed_tokens > 0:
                    self._status("measure speed", ctx, recipe)
                    ref = ctx.model if ev.speed_alternate and model is not ctx.model else None
                    timed_rt = ev.speed_runtime.value if ev.speed_runtime is not None else ev.runtime.value
                    switch = recipe.quant is not None and timed_rt != ev.runtime.value
                    if switch:
                        stages.set_runtime(model, timed_rt)
                    try:
                        speed, activity = stages.measure(model, iface, ctx.workload(), device=str(ctx.device),
                                                         counts=ctx.counts(), repeats=ev.speed_repeats,
                                                         reference=ref)
                    finally:
                        if switch:
                            stages.set_runtime(model, ev.runtime.value)
                    if recipe.quant is not None:
                        speed = speed.model_copy(update={"workload": f"{speed.workload}, {timed_rt} runtime"})
                mem_rt = (ev.speed_runtime or ev.runtime).value if recipe.quant is not None else "16-bit"
                resident = _resident_bytes(model, mem_rt if recipe.quant is not None else None, ev.runtime.value)
                with PeakMemory(str(ctx.device)) as peak:
                    for harness in Harness:
                        reqs = [TaskRequest(t.name, t.num_fewshot, t.limit, t.id) for t in tasks
                                if t.harness is harness]
                        if not reqs:
                            continue

                        def on_task(name: str, _h: str = harness.value) -> None:
                            self._status(f"evaluate ({_h})", ctx, recipe, name)

                        common = dict(include_paths=include_dirs(self.loaded, harness),
                                      include_defaults=ev.include_default_tasks, batch_size=ev.batch_size,
                                      seed=ctx.seed, bootstrap_iters=ev.bootstrap_iters, on_task=on_task)
                        if harness is Harness.LM_EVAL:
                            out = evaluate_lm_eval(model, ctx.tokenizer, reqs, max_length=ctx.spec.max_length,
                                                   **common)
                        else:
                            from mcmoe_vl.evaluation.lmms_eval_backend import evaluate_lmms_eval

                            out = evaluate_lmms_eval(model, ctx.adapter.load_processor(ctx.tokenizer, model), reqs,
                                                     adapter=ctx.adapter, **common)
                        for k, v in out.items():
                            merged.setdefault(k, {}).update(v)
            finally:
                if rule is not None:
                    rule.remove()
        model.train(was_training)
        memory = Memory(resident_bytes=resident, runtime=mem_rt, peak_bytes=peak.bytes, peak_what=peak.what)
        return merged, speed, activity, memory

    def _results_file(self, ctx: _ModelContext, recipe: RecipeSpec, keys: dict[str, str | None],
                      results: dict[str, Any], tasks: list[TaskSpec], speed: Any, activity: Any,
                      acct: QuantAccounting | None, artifact: Any, artifacts: dict[str, Path], out_dir: Path,
                      plan_path: Path | None) -> ResultsFile:
        infos = {}
        for t in tasks:
            tr = results["results"].get(t.key)
            if tr is None:
                raise RuntimeError(f"{t.harness.value} produced no results for task {t.key!r}")
            infos[t.key] = TaskInfo(harness=t.harness.value, metric=primary_metric(tr, t.metric),
                                    label=t.label or t.key, num_fewshot=t.num_fewshot, limit=t.limit)
        total = stages.count_params(ctx.model)
        quant_info = None
        nominal, expert_nominal, effective, size, resident = 16.0, 16.0, 16.0, 2 * total, None
        if recipe.quant is not None:
            assert acct is not None and plan_path is not None
            plan = BitPlan.load(plan_path)
            q = recipe.quant
            quant_info = QuantInfo(
                allocator=q.allocator, target_bits=q.bits, budget=q.budget, bit_set=list(q.resolved_bit_set),
                scope=q.scope, group_size=q.group_size, other_bits=q.other_bits, runtime=self.suite.evaluation.runtime,
                plan={str(la.index): la.bits for la in plan.layers}, plan_achieved=plan.achieved,
                starved_experts=sum(len(v) for v in acct.starved.values()),
                chosen=(plan.selection or {}).get("chosen"), accounting=acct)
            nominal = acct.nominal_bits
            expert_nominal = (acct.expert_nominal_bits if acct.expert_nominal_bits
                              else plan.achieved.get("nominal", nominal))
            effective = acct.effective_bits
            assert acct.bytes_on_disk is not None  # the engine measures every checkpoint it saves
            size = acct.bytes_on_disk
            resident = acct.resident_bytes
        prune_info = stages.prune_summary(artifact, recipe.prune) if recipe.prune is not None else None
        active = [LayerActivity(index=la.index, top_k=la.top_k, avg_active_experts=la.avg_active_experts)
                  for la in activity.layers] if activity is not None else []
        compression = CompressionBlock(
            recipe=recipe.name, baseline=recipe.is_baseline, quant=quant_info, prune=prune_info, nominal_bits=nominal,
            expert_nominal_bits=expert_nominal, effective_bits=effective, size_bytes=size, resident_bytes=resident,
            total_params=total,
            activated_params_per_token=activity.activated_params_per_token if activity is not None else None,
            activated_params_reduction=activity.activated_params_reduction if activity is not None else None,
            active_experts=active, speed=speed,
            artifacts={name: os.path.relpath(p.resolve(), out_dir.resolve()) for name, p in sorted(artifacts.items())},
        )
        return ResultsFile(
            suite=self.suite.name, model=ctx.spec.name, recipe=recipe.name, seed=ctx.seed, date=_utc_now(),
            results=results["results"], versions=results.get("versions", {}),
            n_shot=results.get("n-shot", {}), higher_is_better=results.get("higher_is_better", {}),
            n_samples=results.get("n-samples", {}), tasks=infos, compression=compression,
            config={"model": ctx.spec.model_dump(mode="json"), "checkpoint": ctx.location,
                    "checkpoint_fingerprint": ctx.fingerprint,
                    "recipe": recipe.model_dump(mode="json"), "tasks": [t.model_dump(mode="json") for t in tasks],
                    "calibration": self.suite.calibration.model_dump(mode="json"),
                    "evaluation": self.suite.evaluation.model_dump(mode="json"), "stage_keys": keys},
            software=software_versions(),
        )

    # -- publishing -------------------------------------------------------------------------------------------------
    def published_path(self, model: ModelSpec, recipe: RecipeSpec, seed: int) -> Path:
        return self.run_dir / "results" / slug(model.name) / f"{slug(recipe.name)}-seed{seed}.json"

    def _prune_published(self) -> None:
        """Move aside published results of (model, recipe, seed) no longer in the suite, or whose recipe was changed
        under the same name (the cache keeps them)."""
        root = self.run_dir / "results"
        if not root.exists():
            return
        keep = {self.published_path(m, r, s).resolve(): r for m in self.suite.models for r in self.suite.recipes_for(m)
                for s in self.suite.seeds_for(r)}
        for f in sorted(root.rglob("*.json")):
            recipe = keep.get(f.resolve())
            if recipe is None:
                self._set_aside(f, "not part of the suite any more")
                continue
            try:
                recorded = (read_json(f, what="results file").get("config") or {}).get("recipe")
            except (ValueError, AttributeError):
                recorded = None
            if recorded != recipe.model_dump(mode="json"):
                self._set_aside(f, f"recipe {recipe.name!r} is defined differently now (or the file is unreadable)")

    def _set_aside(self, published: Path, reason: str) -> None:
        """Move a published results file out of ``results/`` (which reports read) into ``results.stale/``."""
        if not published.is_file():
            return
        dst = self.run_dir / "results.stale" / published.relative_to(self.run_dir / "results")
        dst.parent.mkdir(parents=True, exist_ok=True)
        samples = samples_path_for(published)
        if samples.is_file():
            os.replace(samples, samples_path_for(dst))
        os.replace(published, dst)
        log.warning("moved %s to %s: %s", published, dst, reason)

    def publish(self, ctx: _ModelContext, recipe: RecipeSpec, src: Path) -> Path:
        """Copy a cached results file to ``results/<model>/<recipe>-seed<k>.json`` with artifact paths rebased."""
        res = load_results(src)
        dst = self.published_path(ctx.spec, recipe, ctx.seed)
        rebased = {}
        for name, rel in res.compression.artifacts.items():
            target = (src.parent / rel).resolve()
            rebased[name] = os.path.relpath(target, dst.parent.resolve())
        res.compression.artifacts = rebased
        if res.samples is not None:
            write_bytes_atomic(samples_path_for(dst), (src.parent / res.samples.file).read_bytes())
            res.samples = res.samples.model_copy(update={"file": samples_path_for(dst).name})
        save_results(res, dst)
        return dst

    # -- the whole suite --------------------------------------------------------------------------------------------
    def run(self, *, models: list[str] | None = None, recipes: list[str] | None = None,
            write_report: bool = True) -> RunSummary:
        try:
            locations = preflight(self.loaded)
        except SuiteError:
            # refused before any work: results of recipes that changed or left the suite still must not be reported
            if int(os.environ.get("RANK", "0")) == 0:
                self._prune_published()
            raise
        models_dirs = {f"checkpoint directory of model {n!r}": loc for n, (loc, local) in locations.items() if local}
        check_output_outside(self.run_dir, models_dirs, what="run directory")
        check_output_outside(self.report_dir, models_dirs, what="report directory")
        unknown = sorted(set(models or []) - {m.name for m in self.suite.models}) + \
            sorted(set(recipes or []) - {r.name for r in self.suite.recipes})
        if unknown:
            raise ValueError(f"--model / --recipe name(s) {unknown} are not in the suite")
        self._subset = bool(models or recipes)
        dist = _Distributed.from_env()
        if dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "suite.resolved.json", self.loaded.resolved_config())
            self._prune_published()
        dist.barrier()
        todo = [(m, seed, r) for m in self.suite.models if not models or m.name in models
                for seed in self.suite.all_seeds for r in self.suite.recipes_for(m) if not recipes or r.name in recipes
                if seed in self.suite.seeds_for(r)]
        # data-parallel over the (model, seed, recipe) grid: each process takes every world_size-th item
        todo = todo[dist.rank::dist.world_size]
        contexts: dict[tuple[str, int], _ModelContext] = {}
        threads_before = torch.get_num_threads()
        if self.suite.torch_threads is not None:
            torch.set_num_threads(self.suite.torch_threads)
        self._bar = tqdm(todo, desc="suite", unit="recipe", disable=not self.progress, dynamic_ncols=True)
        try:
            for m, seed, r in self._bar:
                ctx = contexts.get((m.name, seed))
                if ctx is None:
                    contexts.clear()  # one model in memory at a time
                    ctx = contexts[(m.name, seed)] = _ModelContext(self, dist.place(m), *locations[m.name], seed)
                label = f"{m.name} / {r.name} / seed {seed}"
                try:
                    keys = self.keys(ctx, r)
                    src = self.evaluate(ctx, r, keys)
                    self.summary.results.append(self.publish(ctx, r, src))
                except stages.StageUnavailable as exc:
                    log.warning("%s: not run: %s", label, exc)
                    self.summary.not_run.append(label)
                    self.summary.notes.append(f"{label}: not run: {exc}")
                    self._set_aside(self.published_path(m, r, seed), f"{label} was not run")
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # one broken recipe must not stop the others; it is reported
                    log.exception("%s failed", label)
                    self.summary.failed.append(label)
                    self.summary.notes.append(f"{label}: FAILED: {type(exc).__name__}: {exc}")
                    # an earlier result under the same name describes another recipe: never report it as current
                    self._set_aside(self.published_path(m, r, seed), f"{label} failed")
        finally:
            self._bar.close()
            self._bar = None
            torch.set_num_threads(threads_before)
        if dist.world_size > 1:
            self.summary = dist.gather_summaries(self.summary)
            if dist.rank != 0:
                return self.summary
        if write_report and self.summary.results:
            from mcmoe_vl.report.build import build_report

            rs = self.suite.report
            self.summary.report = build_report(self.summary.results, self._report_destination(), baseline=rs.baseline,
                                               command=self.command, notes=sorted(self.summary.notes),
                                               title=f"Suite `{self.suite.name}`", compare_to=rs.compare_to,
                                               confidence=rs.confidence, bootstrap=rs.bootstrap)
        return self.summary

    def _report_destination(self) -> Path:
        """The suite's report directory, unless this run is incomplete (a recipe failed or was not run, or only a
        subset was asked for) and a report is already there: that one is the last good report and is kept; this
        run's report, with its failures listed, goes to ``<run dir>/report`` instead. ``overwrite_report`` (the
        CLI's ``--overwrite-report``) replaces it anyway."""
        incomplete = bool(self.summary.failed or self.summary.not_run or self._subset)
        if incomplete and not self.overwrite_report and (self.report_dir / "report.md").exists():
            self.summary.kept_report = self.report_dir / "report.md"
            return self.run_dir / "report"
        return self.report_dir


@dataclass
class _Distributed:
    """Processes started by ``accelerate launch`` / ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment)
    split the suite's (model, seed, recipe) grid; rank 0 gathers every result and writes the report."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> _Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        d = cls(rank=int(os.environ.get("RANK", "0")), world_size=world,
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1:
            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group(backend="gloo", timeout=_dt.timedelta(hours=72))
        return d

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td

            td.barrier()

    def place(self, spec: ModelSpec) -> ModelSpec:
        """Devices of this process: ``cuda`` becomes ``cuda:<local rank>``; a sharded model (``device_map``) gets an
        equal share of the node's GPUs (GPUs ``local_rank * n .. local_rank * n + n - 1`` with n = GPUs / processes
        per node) through ``max_memory``, unless the suite sets ``max_memory`` itself."""
        if self.world_size <= 1 or not spec.device.startswith("cuda"):
            return spec
        if spec.device_map is None:
            return spec.model_copy(update={"device": f"cuda:{self.local_rank}"})
        if spec.max_memory:
            return spec
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        n = torch.cuda.device_count() // max(1, local_world)
        if n < 1:
            raise ValueError(f"{local_world} processes per node but {torch.cuda.device_count()} GPUs: a sharded "
                             f"model needs at least one GPU per process")
        gpus = range(self.local_rank * n, (self.local_rank + 1) * n)
        mem = {str(i): f"{int(torch.cuda.get_device_properties(i).total_memory * 0.9) >> 20}MiB" for i in gpus}
        return spec.model_copy(update={"max_memory": mem, "device": f"cuda:{gpus[0]}"})

    def gather_summaries(self, mine: RunSummary) -> RunSummary:
        import torch.distributed as td

        parts: list[Any] = [None] * self.world_size
        td.all_gather_object(parts, mine)
        out = RunSummary(run_dir=mine.run_dir, report=None)
        for p in parts:
            out.results += p.results
            out.notes += p.notes
            out.failed += p.failed
            out.not_run += p.not_run
            for mine_d, theirs in ((out.reused, p.reused), (out.computed, p.computed)):
                for k, v in theirs.items():
                    mine_d[k] = mine_d.get(k, 0) + v
        return out


def _resident_bytes(model: torch.nn.Module, runtime: str | None, eval_runtime: str) -> int:
    """Bytes the loaded model holds in ``runtime`` (packed: its true size), measured on its storages."""
    from mcmoe_vl.quant.accounting import resident_bytes

    if runtime is None or runtime == eval_runtime:
        return resident_bytes(model, include_caches=True)
    stages.set_runtime(model, runtime)
    try:
        return resident_bytes(model, include_caches=True)
    finally:
        stages.set_runtime(model, eval_runtime)


def _check_lmms_available() -> None:
    """lmms-eval is the one optional dependency: without it the image tasks are reported as not run. An import error
    anywhere else (this project's own modules included) is a bug and fails the recipe loudly."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError as exc:
        raise stages.StageUnavailable(f"lmms-eval evaluation not available ({exc})") from None


def run_suite(loaded: LoadedSuite, *, run_dir: str | os.PathLike[str] | None = None,
              report_dir: str | os.PathLike[str] | None = None, progress: bool = True, command: str | None = None,
              models: list[str] | None = None, recipes: list[str] | None = None,
              overwrite_report: bool = False) -> RunSummary:
    """Run (or resume) every model x recipe x seed of the suite and write its report (see
    :meth:`SuiteRunner._report_destination` for where it goes when the run is incomplete)."""
    runner = SuiteRunner(loaded, run_dir=run_dir, report_dir=report_dir, progress=progress, command=command,
                         overwrite_report=overwrite_report)
    return runner.run(models=models, recipes=recipes)


def _checkpoint_format() -> int:
    """The checkpoint format version: a checkpoint cached in an older format is rewritten, not reloaded."""
    from mcmoe_vl.quant.checkpoint import FORMAT_VERSION

    return FORMAT_VERSION
