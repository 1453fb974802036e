"""The comparative markdown report, built only from saved results files.

::

    build_report(["runs/default/results/a.json", ...], "reports/default")   # -> reports/default/report.md

Per model, the paper-style table (MC-MoE Tables 2 and 4): each task's primary metric, the average over
higher-is-better tasks, its change against the model's baseline row (16-bit unless the suite names another), nominal
and effective bits, size, activated parameters per token and the measured speed-up. Then the accuracy-bits plot
with Pareto fronts, active experts per layer, and the bit-allocation and significance heatmaps the results files
point to (copied beside the report). The order of everything is fixed by the data, not by the order of the files,
and nothing depends on the clock: the same files give the same bytes. Rows carry their run date, so results of
different dates can sit in one report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from mcmoe_vl.allocation.config import Scope
from mcmoe_vl.evaluation.results import ResultsFile, load_results
from mcmoe_vl.io import slug, write_text_atomic

from .comparisons import Settings, average_se, cell, paired_table, seed_spread_table
from .items import row_items
from .plots import active_experts_plot, pareto_plot
from .tables import (
    ReportError,
    Row,
    TaskColumn,
    build_rows,
    fmt_bytes,
    fmt_num,
    fmt_params,
    fmt_signed,
    task_columns,
    task_n,
)

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"


def expand_results_paths(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; directories contribute every ``*.json`` under a ``results`` directory below them."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.json") if "results" in f.relative_to(p).parts[:-1]
                           or p.name == "results")
            if not found:
                raise FileNotFoundError(f"no results files (results/*.json) under {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"results file not found: {p}")
    return sorted(set(out), key=lambda f: f.as_posix())


def _rel(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:
        return path.as_posix()


# Below this many parameters a measured speed-up says little about real sizes (the experts are a small share of
# the time); the report marks it so.
SPEED_MEANINGFUL_PARAMS = 100_000_000


def _speed_label(rows: list[Row]) -> str:
    small = any(r.files[0].compression.total_params < SPEED_MEANINGFUL_PARAMS for r in rows)
    return "Speed-up†" if small else "Speed-up"


def _task_table(rows: list[Row], columns: list[TaskColumn], baseline_label: str, files: list[ResultsFile],
                s: Settings) -> list[str]:
    def title(c: TaskColumn) -> str:
        n = task_n(files, rows, c)
        return c.label + ("" if c.higher_is_better else " (ppl↓)") + (f" n={n}" if n is not None else "")

    head = ["Recipe", "Seeds"] + [title(c) for c in columns] + [
        "Avg", f"Δ vs {baseline_label}", "Bits (nominal)", "Bits (effective)", "Size", "Resident", "Peak (eval)",
        "Activated params", _speed_label(rows)]
    multi_run = len({r.run for r in rows}) > 1
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        name = r.recipe + (f" ({r.run})" if multi_run else "")
        cells = [name, str(len(r.seeds))] + [cell(r, c, s) for c in columns]
        act = fmt_params(r.activated_params)
        if r.activated_reduction is not None and r.activated_reduction > 5e-4:
            act += f" (−{100 * r.activated_reduction:.1f}%)"
        se = average_se(r, columns)
        mem = [f.compression.memory for f in r.files]
        resident = mem[0].resident_bytes if mem[0] is not None else None
        peak = max((m.peak_bytes for m in mem if m is not None and m.peak_bytes is not None), default=None)
        cells += [fmt_num(r.average) + ("" if se is None or r.average is None else f" ± {fmt_num(se)}"),
                  "—" if r.baseline else fmt_signed(r.delta), fmt_num(r.nominal_bits),
                  fmt_num(r.effective_bits), fmt_bytes(r.size_bytes), fmt_bytes(resident), fmt_bytes(peak), act,
                  "1.00x" if r.baseline and r.tokens_per_second else
                  ("-" if r.speedup is None else f"{r.speedup:.2f}x")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _metric_legend(columns: list[TaskColumn], rows: list[Row], s: Settings) -> str:
    parts = []
    for c in columns:
        unit = "accuracy-like, x100" if c.percent else ("lower is better" if not c.higher_is_better else "as is")
        parts.append(f"`{c.label}` = {c.harness} `{c.task}` `{c.metric}` ({unit})")
    text = "Metrics: " + "; ".join(parts) + "; n = documents per task."
    if any(r.items for r in rows):
        text += (" `a ± b`: score ± its standard error over the n documents (with several seeds: the mean over "
                 "seeds, its standard error including the seed spread); perplexities: `value [low, high]`, a "
                 f"{s.pct} bootstrap interval over documents ({s.iters} resamples). Avg ± the standard error of the "
                 "average over tasks. Δ is the plain difference of averages; whether it is more than noise is in the "
                 "paired-differences table below.")
    else:
        text += " These results files carry no per-item outputs, so no uncertainty is shown."
    text += (" Resident: bytes of the loaded model's tensors in the runtime named in its results file (packed: the "
             "compressed model at its true size); Peak (eval): the process's peak resident memory while the harness "
             "evaluated it (includes Python and the harness), both measured.")
    if any(r.measured_speedup is not None for r in rows):
        text += (" Speed-up: tokens per second on the fixed prefill workload against the original model timed in "
                 "alternation with each recipe (same minutes, same machine load).")
    elif any(r.tokens_per_second for r in rows):
        text += " Speed-up: tokens per second on the fixed prefill workload against the baseline row's."
    if _speed_label(rows).endswith("†"):
        n = min(r.files[0].compression.total_params for r in rows)
        text += (f" † Not meaningful at this size: on a model of {fmt_params(n)} parameters the experts are a small "
                 "share of the time, so the speed-up says nothing about real sizes; real-size speeds come from the "
                 "kernel benchmark (`benchmarks/`).")
    return text


def build_report(
    results_paths: list[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    title: str | None = None,
    baseline: str | None = None,
    command: str | None = None,
    notes: list[str] | None = None,
    compare_to: str | None = None,
    confidence: float = 0.95,
    bootstrap: int = 2000,
) -> Path:
    """Write ``output_dir/report.md`` (and its figures) from the results files; return the report's path.

    ``baseline``: the recipe each model's rows are compared with (default: the rows marked baseline, 16-bit).
    ``command``: the command line shown in the report. ``notes``: extra lines (e.g. recipes that could not run).
    ``compare_to``: the recipe every compressed row is also compared with by the paired test (default: see
    :func:`mcmoe_vl.report.comparisons.paired_baseline`). ``confidence``: level of intervals and significance marks;
    ``bootstrap``: resamples per interval (seeded from the names compared: the same files give the same bytes).
    """
    settings = Settings(confidence=confidence, iters=bootstrap)
    paths = expand_results_paths(list(results_paths))
    if not paths:
        raise ReportError("no results files given")
    out = Path(output_dir)
    files: list[ResultsFile] = [load_results(p) for p in paths]  # every file validated before anything is written
    origin = {id(f): p for f, p in zip(files, paths)}
    # every row with its per-item outputs, read (and their digests checked) before anything is written
    columns = {m: task_columns(files, m) for m in sorted({f.model for f in files})}
    built = {m: build_rows(files, m, cols) for m, cols in columns.items()}
    for rows in built.values():
        for r in rows:
            r.items = row_items(r.files, [origin[id(f)] for f in r.files])
    fig_dir = out / "figures"
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)

    models = sorted({f.model for f in files})
    lines = _header(files, title, command, notes)
    rows_by_model: dict[str, list[Row]] = {}
    for model in models:
        rows_by_model[model] = rows = built[model]
        if baseline:
            _set_baseline(rows, baseline)
        lines += _model_section(model, rows, columns[model], files, baseline, compare_to, settings)
    lines += _figures(files, origin, rows_by_model, fig_dir, out)
    lines += _sources(files, paths, out)
    report = out / REPORT_NAME
    write_text_atomic(report, "\n".join(lines) + "\n")
    log.info("wrote %s (%d results files, %d models)", report, len(files), len(models))
    return report


def _header(files: list[ResultsFile], title: str | None, command: str | None, notes: list[str] | None) -> list[str]:
    suites = sorted({f.suite for f in files})
    dates = sorted({f.date for f in files})
    lines = [f"# {title or 'Compression report: ' + ', '.join(suites)}", ""]
    if command:
        lines += ["Made by:", "", "```", command, "```", ""]
    lines += [f"Built from {len(files)} results file(s) of suite(s) {', '.join(f'`{s}`' for s in suites)}, "
              f"run between {dates[0]} and {dates[-1]}. Every number below is read from those files.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return lines


def _set_baseline(rows: list[Row], baseline: str) -> None:
    """Mark ``baseline``'s rows, sort them first and give every row its Δ and speed-up against its reference."""
    from .tables import reference_row

    for r in rows:
        r.baseline = r.recipe == baseline
    rows.sort(key=lambda r: (not r.baseline, -r.nominal_bits, r.recipe, r.run))
    for r in rows:
        ref = reference_row(rows, r, baseline)
        r.delta = None if ref is None or r.average is None or ref.average is None else r.average - ref.average
        r.speedup = (r.tokens_per_second / ref.tokens_per_second
                     if ref is not None and r.tokens_per_second and ref.tokens_per_second else None)


def _model_section(model: str, rows: list[Row], cols: list[TaskColumn], files: list[ResultsFile],
                   baseline: str | None, compare_to: str | None, settings: Settings) -> list[str]:
    """One model's tables: scores with intervals, seed spread, paired differences, details."""
    base_label = baseline or next((r.recipe for r in rows if r.baseline), "baseline")
    lines = [f"## {model}", ""]
    lines += _task_table(rows, cols, base_label, files, settings)
    lines += ["", _metric_legend(cols, rows, settings), ""]
    spread = seed_spread_table(rows, cols)
    if spread:
        lines += ["Spread over calibration seeds (sample standard deviation of each task's score, display "
                  "units); the intervals above and below include it.", ""] + spread + [""]
    ptab = paired_table(rows, cols, baseline, compare_to, settings)
    if ptab:
        lines += [f"**Paired differences** (row minus the recipe it is compared with; accuracies in points, "
                  f"perplexities in % of the other recipe's), with {settings.pct} intervals from a paired "
                  f"bootstrap over the same documents ({settings.iters} resamples; seeds resampled too). "
                  f"**Bold** ▲ / ▼: significantly better / worse at {settings.pct} (the interval excludes 0); "
                  "anything else is within noise.", ""] + ptab + [""]
    return lines + _details(rows)


def _figures(files: list[ResultsFile], origin: dict[int, Path], rows_by_model: dict[str, list[Row]],
             fig_dir: Path, out: Path) -> list[str]:
    """The accuracy-against-bits panel, the pruned recipes' active experts, the bit-allocation heatmaps."""
    lines = ["## Accuracy against bits", ""]
    pareto = pareto_plot(rows_by_model, fig_dir / "pareto.png")
    lines += [f"![accuracy against bits]({_rel(pareto, out)})", "",
              "One panel per model: its average over the higher-is-better tasks (± standard error) against nominal "
              "bits; the line joins the model's Pareto-optimal recipes (no recipe with fewer bits scores higher).", ""]

    active = [(m, [r for r in rows if r.files[0].compression.prune]) for m, rows in rows_by_model.items()]
    active = [(m, rs) for m, rs in active if rs]
    if active:
        lines += ["## Active experts per layer", "", "The pruned recipes only (every other recipe runs top-k).", ""]
    for model, pruned in active:
        p = active_experts_plot(pruned, model, fig_dir / f"active-experts-{slug(model)}.png")
        if p is not None:
            lines += [f"![active experts per layer, {model}]({_rel(p, out)})", ""]
        lines += _activity_table(pruned)

    heat = _heatmaps(files, origin, fig_dir, out)
    if heat:
        lines += ["## Bit allocation and expert significance", ""] + heat
    return lines


def _sources(files: list[ResultsFile], paths: list[Path], out: Path) -> list[str]:
    """The results files read, with their digests, and every distinct provenance value."""
    lines = ["## Sources", "", "| File | Suite | Model | Recipe | Seed | Date | SHA-256 |",
             "|---|---|---|---|---:|---|---|"]
    for f, p in sorted(zip(files, paths), key=lambda fp: (fp[0].model, fp[0].recipe, fp[0].seed, fp[0].date)):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        lines.append(f"| `{_rel(p, out)}` | {f.suite} | {f.model} | {f.recipe} | {f.seed} | {f.date} | {digest} |")
    return lines + [""] + _provenance(files)


def _provenance(files: list[ResultsFile]) -> list[str]:
    """Every distinct value of the results files' provenance and software, listed once."""
    def distinct(get) -> str:  # type: ignore[no-untyped-def]
        vals = sorted({json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
                       for f in files if (v := get(f)) is not None})
        return "; ".join(f"`{v}`" for v in vals) if vals else "not recorded"

    def lock(f: ResultsFile) -> str | None:
        if "lock" not in f.provenance:
            return None
        lk = f.provenance["lock"]
        return "none found (null)" if lk is None else f"{lk['path']} sha256 {lk['sha256'][:16]}"

    lines = ["## Provenance", "", "| what | value |", "|---|---|",
             f"| dependency lock | {distinct(lock)} |",
             f"| CPU | {distinct(lambda f: f.provenance.get('cpu'))} |",
             f"| GPU | {distinct(lambda f: f.provenance.get('gpu'))} |",
             f"| Python | {distinct(lambda f: f.provenance.get('python'))} |",
             f"| seeds | {distinct(lambda f: f.provenance.get('seeds'))} |",
             f"| command | {distinct(lambda f: f.provenance.get('command'))} |"]
    soft = sorted({(k, v) for f in files for k, v in f.software.items()})
    for k in sorted({k for k, _ in soft}):
        lines.append(f"| {k} | {'; '.join(v for kk, v in soft if kk == k)} |")
    return lines


def _details(rows: list[Row]) -> list[str]:
    """One line per compressed row: allocator, target and achieved bits, pruning settings, runtime."""
    out = []
    for r in rows:
        c = r.files[0].compression
        bits = []
        if c.quant:
            q = c.quant
            runtime = f", {q.runtime.value} runtime" if q.runtime is not None else ""
            bits.append(f"{q.allocator} allocator, target {q.target_bits} {q.budget.value} bits over widths "
                        f"{q.bit_set}, experts at {fmt_num(c.expert_nominal_bits, 3)} nominal bits{runtime}")
            if q.scope is Scope.GLOBAL:
                bits.append("one global budget over all layers")
            if q.chosen:
                bits.append(f"pmq+ chose the {q.chosen} candidate by calibration loss")
            if q.starved_experts:
                bits.append(f"{q.starved_experts} starved expert(s) fell back to round-to-nearest")
        if c.prune:
            fitted = {"method", "mu", "calibration_pruned_fraction", "summary"}  # per-layer numbers: not settings
            p = c.prune.model_dump(mode="json", exclude=fitted)
            settings = ", ".join(f"{k}={v}" for k, v in sorted(p.items()))
            bits.append(f"{c.prune.method.value.upper()} ({settings})")
        if bits:
            out.append(f"- **{r.recipe}**: " + "; ".join(bits) + ".")
    return out + ([""] if out else [])


def _activity_table(rows: list[Row]) -> list[str]:
    acts = [(r, r.files[0].compression.active_experts) for r in rows]
    acts = [(r, a) for r, a in acts if a]
    if not acts:
        return []
    layers = [a.index for a in acts[0][1]]
    lines = ["| Recipe | " + " | ".join(f"L{i}" for i in layers) + " | top-k |",
             "|---|" + "---:|" * (len(layers) + 1)]
    for r, a in acts:
        vals = [sum(f.compression.active_experts[j].avg_active_experts for f in r.files) / len(r.files)
                for j in range(len(a))]
        lines.append(f"| {r.recipe} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {a[0].top_k} |")
    return lines + [""]


def _heatmaps(files: list[ResultsFile], origin: dict[int, Path], fig_dir: Path, out: Path) -> list[str]:
    """Per model, the first seed's expert-significance map (named after the model), then the bit-allocation map of
    each recipe whose plan is not uniform (a uniform plan's map is one colour and says nothing)."""
    lines: list[str] = []
    seen: set[str] = set()
    first_seed = {m: min(f.seed for f in files if f.model == m) for m in {f.model for f in files}}
    for f in sorted(files, key=lambda f: (f.model, "significance" not in "".join(f.compression.artifacts), f.recipe,
                                          f.seed, f.date)):
        if f.seed != first_seed[f.model]:
            continue
        for name, rel in sorted(f.compression.artifacts.items(), key=lambda kv: ("significance" not in kv[0], kv[0])):
            src = (origin[id(f)].parent / rel)
            significance = "significance" in name
            if not significance and _uniform_plan(f):
                continue
            if not src.is_file():
                log.warning("%s: artifact %s not found at %s; left out of the report", origin[id(f)], name, src)
                continue
            digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
            key = f"{f.model}/significance" if significance else digest
            if key in seen or digest in seen:  # one significance map per model; the same picture once
                continue
            seen.update({key, digest})
            stem = f"{slug(f.model)}-{slug(name)}" if significance else \
                f"{slug(f.model)}-{slug(f.recipe)}-{slug(name)}"
            dst = fig_dir / f"{stem}{src.suffix}"
            shutil.copyfile(src, dst)
            caption = (f"{f.model}: expert significance (calibration seed {f.seed})" if significance
                       else f"{f.model}: {name.replace('_', ' ')}, {f.recipe}")
            lines += [f"**{caption}**", "", f"![{caption}]({_rel(dst, out)})", ""]
    return lines


def _uniform_plan(f: ResultsFile) -> bool:
    """Every expert of the plan has the same width (or there is no plan)."""
    plan = f.compression.quant.plan if f.compression.quant is not None else {}
    widths = {b for layer in plan.values() for b in layer}
    return len(widths) <= 1
