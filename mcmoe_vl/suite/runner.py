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

Each (model, recipe, seed) runs as a loop over the stages in pipeline order (:data:`PIPELINE`, then evaluate), each
stage given its typed inputs (:mod:`.inputs`) and its predecessors' products. ``<key>`` hashes the stage's inputs, including the keys of the stages before it (:mod:`.cache`), so a re-run does
only what changed and an interrupted run resumes; a stage directory without its completion record is redone.
Everything the suite asks for is checked first (:func:`.load.preflight`). Only the optional lmms-eval may be missing
(:class:`.stages.StageUnavailable`): its recipes are skipped with a note in the report; the others still run. Any other
import error is a bug and fails loudly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mcmoe_vl.evaluation.compression import QuantAccounting
from mcmoe_vl.evaluation.provenance import provenance
from mcmoe_vl.evaluation.results import save_results
from mcmoe_vl.evaluation.samples import samples_path_for, write_samples
from mcmoe_vl.io import check_output_outside, write_json_atomic

from . import stages
from .cache import StageCache
from .context import ModelContext
from .distributed import Distributed, RunSummary
from .evaluate import evaluate_model
from .inputs import CHECKPOINT_FORMAT, AllocateInputs, CalibrateInputs, PruneInputs, QuantizeInputs, RecipeInputs
from .load import LoadedSuite, SuiteError, include_dirs, preflight
from .results import Publisher, results_file, software_versions
from .recipe import PLUS_METHOD
from .schema import Harness, RecipeSpec, Suite, slug

log = logging.getLogger(__name__)


PIPELINE = ("calibrate", "allocate", "quantize", "prune")  # then evaluate (METHOD.md's order)


@dataclass
class _Products:
    """What the stages of one recipe have produced so far (each stage reads its predecessors' products)."""

    stats: Any = None  # calibration statistics
    plan_dir: Path | None = None  # the allocate stage's directory (plan.json)
    ckpt: Path | None = None  # the quantized checkpoint
    acct: QuantAccounting | None = None
    model: torch.nn.Module | None = None  # the evaluated model, once loaded
    pruning: Any = None  # the pruning artifact
    artifacts: dict[str, Path] = field(default_factory=dict)  # figures for the results file


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
        self.publisher = Publisher(self.run_dir, self.suite)
        self._bar: Any = None
        self._version = software_versions().get("mcmoe_vl", "dev")

    # -- bookkeeping ------------------------------------------------------------------------------------------------
    def _status(self, stage: str, ctx: ModelContext, recipe: RecipeSpec, task: str | None = None) -> None:
        text = f"{stage} | {ctx.spec.name} | {recipe.name}" + (f" | {task}" if task else "")
        if self._bar is not None:
            self._bar.set_description_str(text)
        log.info("%s", text)

    def _hit(self, stage: str) -> None:
        self.summary.reused[stage] = self.summary.reused.get(stage, 0) + 1

    def _miss(self, stage: str) -> None:
        self.summary.computed[stage] = self.summary.computed.get(stage, 0) + 1

    # -- inputs ---------------------------------------------------------------------------------------------------
    def inputs(self, ctx: ModelContext, recipe: RecipeSpec) -> RecipeInputs:
        """Every stage's typed inputs of a recipe (no stage is run): each is hashed for its cache key and passed to
        its stage."""
        return RecipeInputs.build(self.suite, ctx, recipe, version=self._version, software=software_versions(),
                                  checkpoint_format=CHECKPOINT_FORMAT)

    def keys(self, ctx: ModelContext, recipe: RecipeSpec) -> dict[str, str | None]:
        """Every stage key of a recipe, computed from its inputs only (no stage is run)."""
        return self.inputs(ctx, recipe).keys()

    # -- stages -----------------------------------------------------------------------------------------------------
    def calibrate(self, ctx: ModelContext, recipe: RecipeSpec, inp: CalibrateInputs) -> tuple[Any, Path]:
        with self.cache.lock("calibrate", inp.key):
            return self._calibrate(ctx, recipe, inp)

    def allocate(self, ctx: ModelContext, recipe: RecipeSpec, inp: AllocateInputs, stats: Any) -> Path:
        with self.cache.lock("allocate", inp.key):
            return self._allocate(ctx, recipe, inp, stats)

    def quantize(self, ctx: ModelContext, recipe: RecipeSpec, inp: QuantizeInputs, plan_dir: Path
                 ) -> tuple[Path, QuantAccounting]:
        with self.cache.lock("quantize", inp.key):
            return self._quantize(ctx, recipe, inp, plan_dir)

    def prune(self, ctx: ModelContext, recipe: RecipeSpec, inp: PruneInputs, model: torch.nn.Module) -> Any:
        with self.cache.lock("prune", inp.key):
            return self._prune(ctx, recipe, inp, model)

    def evaluate(self, ctx: ModelContext, recipe: RecipeSpec, inputs: RecipeInputs) -> Path:
        with self.cache.lock("evaluate", inputs.evaluate.key):
            return self._evaluate(ctx, recipe, inputs)

    def _calibrate(self, ctx: ModelContext, recipe: RecipeSpec, inp: CalibrateInputs) -> tuple[Any, Path]:
        from mcmoe_vl.calibration.stats import load_stats

        key = inp.key
        d = self.cache.dir("calibrate", key)
        if self.cache.lookup("calibrate", key) is not None:
            self._hit("calibrate")
            return load_stats(d / "stats.json"), d
        self._status("calibrate", ctx, recipe)
        if (d / "stage.json").exists():  # finished once, changed since: redone from scratch, nothing kept
            d = self.cache.begin("calibrate", key)
        # else not cleared: an interrupted pass resumes from its own partial file once the file proves intact
        d.mkdir(parents=True, exist_ok=True)
        assert (inp.data, inp.seed) == (ctx.calibration_source, ctx.seed)  # the batches these inputs describe
        stats = stages.calibrate(ctx.model, ctx.calibration_batches(), inp.calibration, group_size=inp.group_size,
                                 output=d / "stats.json", model_name=ctx.spec.name,
                                 model_fingerprint=ctx.fingerprint.get("files", ctx.fingerprint),
                                 progress=self.progress)
        files = ["stats.json"]
        if self.suite.report.heatmaps:
            stages.significance_plot(stats, d / "significance.png")
            files.append("significance.png")
        self.cache.commit("calibrate", key, inputs=inp.hashed(), files=files)
        self._miss("calibrate")
        return stats, d

    def _allocate(self, ctx: ModelContext, recipe: RecipeSpec, inp: AllocateInputs, stats: Any) -> Path:
        key, a = inp.key, inp.allocation
        d = self.cache.dir("allocate", key)
        if self.cache.lookup("allocate", key) is not None:
            self._hit("allocate")
            return d
        self._status("allocate", ctx, recipe)
        d = self.cache.begin("allocate", key)
        stages.allocate(stats, a, inp.plus, plan_path=d / "plan.json", heatmap_path=d / "allocation.png",
                        title=f"{a.method} allocation, {ctx.spec.name}, {a.target_bits:g} bits",
                        plus_data=lambda: (ctx.model, ctx.calibration_batches(), ctx.selection_batches()),
                        adapter=ctx.adapter)
        files = ["plan.json", "allocation.png"] + (["stats_gptq.json"] if a.method == PLUS_METHOD else [])
        self.cache.commit("allocate", key, inputs={"calibrate": inp.calibrate.key, "recipe": recipe.name},
                          files=files)
        self._miss("allocate")
        return d

    def _quantize(self, ctx: ModelContext, recipe: RecipeSpec, inp: QuantizeInputs, plan_dir: Path
                  ) -> tuple[Path, QuantAccounting]:
        key = inp.key
        d = self.cache.dir("quantize", key)
        rec = self.cache.lookup("quantize", key)
        if rec is not None:
            self._hit("quantize")
            return d / "checkpoint", QuantAccounting.model_validate(rec["info"])
        self._status("quantize", ctx, recipe)
        d = self.cache.begin("quantize", key)
        model = ctx.fresh_model()
        acct = stages.quantize(model, plan_dir / "plan.json", ctx.calibration_batches(), inp.gptq,
                               group_size=inp.allocate.allocation.group_size, out_dir=d / "checkpoint",
                               progress=self.progress, adapter=ctx.adapter)
        del model
        files = [p.relative_to(d).as_posix() for p in sorted((d / "checkpoint").rglob("*")) if p.is_file()]
        self.cache.commit("quantize", key, inputs={"allocate": inp.allocate.key, "recipe": recipe.name}, files=files,
                          info=acct.model_dump(mode="json"))
        self._miss("quantize")
        return d / "checkpoint", acct

    def compressed_model(self, ctx: ModelContext, recipe: RecipeSpec, ckpt: Path | None, *, runtime: str
                         ) -> torch.nn.Module:
        """The model the recipe evaluates: the original, or the quantized checkpoint in the requested runtime."""
        if ckpt is None:
            return ctx.model
        return stages.load_quantized(ctx.fresh_model(), ckpt, runtime, ctx.adapter)

    def _prune(self, ctx: ModelContext, recipe: RecipeSpec, inp: PruneInputs, model: torch.nn.Module) -> Any:
        from mcmoe_vl.pruning.artifact import load_pruning

        key = inp.key
        d = self.cache.dir("prune", key)
        if self.cache.lookup("prune", key) is not None:
            self._hit("prune")
            return load_pruning(d / "pruning.json")
        self._status(f"prune ({inp.prune.method.value})", ctx, recipe)
        d = self.cache.begin("prune", key)
        stages.fit_pruning(model, ctx.calibration_batches(), inp.prune, out=d / "pruning.json", progress=self.progress,
                           adapter=ctx.adapter)
        files = [p.name for p in sorted(d.iterdir()) if p.is_file()]
        base = inp.base.key if inp.base is not None else None
        self.cache.commit("prune", key, inputs={"base": base, "recipe": recipe.name}, files=files)
        self._miss("prune")
        return load_pruning(d / "pruning.json")

    def _evaluate(self, ctx: ModelContext, recipe: RecipeSpec, inputs: RecipeInputs) -> Path:
        key, keys = inputs.evaluate.key, inputs.keys()
        d = self.cache.dir("evaluate", key)
        if self.cache.lookup("evaluate", key) is not None:
            self._hit("evaluate")
            return d / "results.json"
        tasks = inputs.evaluate.tasks
        if any(t.harness is Harness.LMMS_EVAL for t in tasks):
            _check_lmms_available()
        out = _Products()
        for name in PIPELINE:  # the stages before evaluate, in pipeline order, each with its own inputs
            inp = getattr(inputs, name)
            if inp is not None:
                getattr(self, f"_stage_{name}")(ctx, recipe, inp, out)
        runtime = inputs.evaluate.evaluation.runtime.value
        model = out.model if out.model is not None else self.compressed_model(ctx, recipe, out.ckpt, runtime=runtime)
        artifact, acct, artifacts = out.pruning, out.acct, out.artifacts

        self._status("evaluate", ctx, recipe)
        results, speed, activity, memory = evaluate_model(
            model, ctx, quantized=recipe.quant is not None, artifact=artifact, tasks=tasks,
            ev=inputs.evaluate.evaluation, include=lambda h: include_dirs(self.loaded, h),
            status=lambda stage, task=None: self._status(stage, ctx, recipe, task))
        if model is not ctx.model:
            del model
        d = self.cache.begin("evaluate", key)
        plan_path = self.cache.dir("allocate", keys["allocate"]) / "plan.json" if keys["allocate"] else None
        res = results_file(self.suite, ctx, recipe, keys, results, tasks, speed, activity, acct, artifact, artifacts,
                           d, plan_path=plan_path)
        res.compression.memory = memory
        res.samples = write_samples(samples_path_for(d / "results.json"), results.get("samples") or {})
        res.provenance = provenance(command=self.command, seeds=self.suite.seeds_for(recipe))
        save_results(res, d / "results.json")
        self.cache.commit("evaluate", key, inputs={"recipe": recipe.name, "model": ctx.spec.name, "seed": ctx.seed},
                          files=["results.json", res.samples.file])
        self._miss("evaluate")
        return d / "results.json"

    # -- the stages before evaluate, as steps of the pipeline loop -------------------------------------------------
    def _stage_calibrate(self, ctx: ModelContext, recipe: RecipeSpec, inp: CalibrateInputs, out: _Products) -> None:
        out.stats, cdir = self.calibrate(ctx, recipe, inp)
        if (cdir / "significance.png").is_file():
            out.artifacts["significance_heatmap"] = cdir / "significance.png"

    def _stage_allocate(self, ctx: ModelContext, recipe: RecipeSpec, inp: AllocateInputs, out: _Products) -> None:
        out.plan_dir = self.allocate(ctx, recipe, inp, out.stats)
        out.artifacts["allocation_heatmap"] = out.plan_dir / "allocation.png"

    def _stage_quantize(self, ctx: ModelContext, recipe: RecipeSpec, inp: QuantizeInputs, out: _Products) -> None:
        assert out.plan_dir is not None  # allocate ran before
        out.ckpt, out.acct = self.quantize(ctx, recipe, inp, out.plan_dir)

    def _stage_prune(self, ctx: ModelContext, recipe: RecipeSpec, inp: PruneInputs, out: _Products) -> None:
        runtime = self.suite.evaluation.runtime.value
        out.model = self.compressed_model(ctx, recipe, out.ckpt, runtime=runtime)  # pruning fits the evaluated model
        out.pruning = self.prune(ctx, recipe, inp, out.model)

    # -- the whole suite --------------------------------------------------------------------------------------------
    def run(self, *, models: list[str] | None = None, recipes: list[str] | None = None,
            write_report: bool = True) -> RunSummary:
        try:
            locations = preflight(self.loaded)
        except SuiteError:
            # refused before any work: results of recipes that changed or left the suite still must not be reported
            if int(os.environ.get("RANK", "0")) == 0:
                self.publisher.prune_published()
            raise
        models_dirs = {f"checkpoint directory of model {n!r}": loc for n, (loc, local) in locations.items() if local}
        check_output_outside(self.run_dir, models_dirs, what="run directory")
        check_output_outside(self.report_dir, models_dirs, what="report directory")
        unknown = sorted(set(models or []) - {m.name for m in self.suite.models}) + \
            sorted(set(recipes or []) - {r.name for r in self.suite.recipes})
        if unknown:
            raise ValueError(f"--model / --recipe name(s) {unknown} are not in the suite")
        self._subset = bool(models or recipes)
        dist = Distributed.from_env()
        if dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "suite.resolved.json", self.loaded.resolved_config())
            self.publisher.prune_published()
        dist.barrier()
        todo = [(m, seed, r) for m in self.suite.models if not models or m.name in models
                for seed in self.suite.all_seeds for r in self.suite.recipes_for(m) if not recipes or r.name in recipes
                if seed in self.suite.seeds_for(r)]
        # data-parallel over the (model, seed, recipe) grid: each process takes every world_size-th item
        todo = todo[dist.rank::dist.world_size]
        contexts: dict[tuple[str, int], ModelContext] = {}
        threads_before = torch.get_num_threads()
        if self.suite.torch_threads is not None:
            torch.set_num_threads(self.suite.torch_threads)
        self._bar = tqdm(todo, desc="suite", unit="recipe", disable=not self.progress, dynamic_ncols=True)
        try:
            for m, seed, r in self._bar:
                ctx = contexts.get((m.name, seed))
                if ctx is None:
                    contexts.clear()  # one model in memory at a time
                    ctx = ModelContext(self.suite, self.loaded.base_dir, dist.place(m), *locations[m.name], seed)
                    contexts[(m.name, seed)] = ctx
                self._run_recipe(ctx, r)
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

    def _run_recipe(self, ctx: ModelContext, r: RecipeSpec) -> None:
        """Run and publish one (model, recipe, seed); a failure is recorded, never raised (the others still run)."""
        label = f"{ctx.spec.name} / {r.name} / seed {ctx.seed}"
        published = self.publisher.published_path(ctx.spec, r, ctx.seed)
        try:
            src = self.evaluate(ctx, r, self.inputs(ctx, r))
            self.summary.results.append(self.publisher.publish(ctx, r, src))
        except stages.StageUnavailable as exc:
            log.warning("%s: not run: %s", label, exc)
            self.summary.not_run.append(label)
            self.summary.notes.append(f"{label}: not run: {exc}")
            self.publisher.set_aside(published, f"{label} was not run")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one broken recipe must not stop the others; it is reported
            log.exception("%s failed", label)
            self.summary.failed.append(label)
            self.summary.notes.append(f"{label}: FAILED: {type(exc).__name__}: {exc}")
            # an earlier result under the same name describes another recipe: never report it as current
            self.publisher.set_aside(published, f"{label} failed")

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
