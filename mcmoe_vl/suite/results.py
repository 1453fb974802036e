"""Results of a suite run: the results file of one (model, recipe, seed) built from what its stages produced, and
their publication under ``results/<model>/<recipe>-seed<k>.json`` (results of recipes that failed or left the suite
are moved aside to ``results.stale/``, never read by a report)."""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

from mcmoe_vl.evaluation.compression import QuantAccounting, QuantInfo
from mcmoe_vl.evaluation.results import (
    CompressionBlock,
    LayerActivity,
    ResultsFile,
    TaskInfo,
    load_results,
    primary_metric,
    save_results,
)
from mcmoe_vl.evaluation.samples import samples_path_for
from mcmoe_vl.io import read_json, write_bytes_atomic
from mcmoe_vl.quant.plan import BitPlan

from . import stages
from .context import ModelContext
from .schema import ModelSpec, RecipeSpec, Suite, TaskSpec, slug

log = logging.getLogger(__name__)


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


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def results_file(suite: Suite, ctx: ModelContext, recipe: RecipeSpec, keys: dict[str, str | None],
                 results: dict[str, Any], tasks: list[TaskSpec], speed: Any, activity: Any,
                 acct: QuantAccounting | None, artifact: Any, artifacts: dict[str, Path], out_dir: Path,
                 plan_path: Path | None) -> ResultsFile:
    """The results file of one (model, recipe, seed): the harnesses' results, the task infos and the compression
    block built from the stages' artifacts (plan, accounting, pruning summary, speed and activity)."""
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
        a = recipe.quant.allocation
        quant_info = QuantInfo(
            allocator=a.method, target_bits=a.target_bits, budget=a.budget, bit_set=list(a.bits),
            scope=a.scope, group_size=a.group_size, other_bits=a.other_bits, runtime=suite.evaluation.runtime,
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
        suite=suite.name, model=ctx.spec.name, recipe=recipe.name, seed=ctx.seed, date=utc_now(),
        results=results["results"], versions=results.get("versions", {}),
        n_shot=results.get("n-shot", {}), higher_is_better=results.get("higher_is_better", {}),
        n_samples=results.get("n-samples", {}), tasks=infos, compression=compression,
        config={"model": ctx.spec.model_dump(mode="json"), "checkpoint": ctx.location,
                "checkpoint_fingerprint": ctx.fingerprint,
                "recipe": recipe.model_dump(mode="json"), "tasks": [t.model_dump(mode="json") for t in tasks],
                "calibration": suite.calibration.model_dump(mode="json"),
                "evaluation": suite.evaluation.model_dump(mode="json"), "stage_keys": keys},
        software=software_versions(),
    )


class Publisher:
    """Publishes cached results files of one run directory and keeps ``results/`` equal to the suite's rows."""

    def __init__(self, run_dir: Path, suite: Suite) -> None:
        self.run_dir, self.suite = run_dir, suite

    def published_path(self, model: ModelSpec, recipe: RecipeSpec, seed: int) -> Path:
        return self.run_dir / "results" / slug(model.name) / f"{slug(recipe.name)}-seed{seed}.json"

    def prune_published(self) -> None:
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
                self.set_aside(f, "not part of the suite any more")
                continue
            try:
                recorded = (read_json(f, what="results file").get("config") or {}).get("recipe")
            except (ValueError, AttributeError):
                recorded = None
            if recorded != recipe.model_dump(mode="json"):
                self.set_aside(f, f"recipe {recipe.name!r} is defined differently now (or the file is unreadable)")

    def set_aside(self, published: Path, reason: str) -> None:
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

    def publish(self, ctx: ModelContext, recipe: RecipeSpec, src: Path) -> Path:
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
