"""Reports: built only from results files, numbers equal to the files, deterministic bytes, schema checks."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from mcmoe_vl.evaluation.results import (
    RESULTS_SCHEMA,
    CompressionBlock,
    LayerActivity,
    ResultsFile,
    ResultsSchemaError,
    Speed,
    TaskInfo,
    load_results,
    primary_metric,
    save_results,
)
from mcmoe_vl.evaluation.samples import samples_path_for, write_samples
from mcmoe_vl.report.build import build_report
from mcmoe_vl.report.plots import pareto_front, spread_labels
from mcmoe_vl.report.tables import ReportError


N_MC, N_PPL = 20, 10


def item_outcomes(acc: float, n: int = N_MC) -> list[float]:
    """n 0/1 outcomes with mean ``acc`` (the first round(acc * n) correct)."""
    k = round(acc * n)
    return [1.0] * k + [0.0] * (n - k)


def ppl_items(ppl: float) -> list[list[float]]:
    """N_PPL documents of 10 words whose pooled word perplexity is ``ppl`` (log-likelihoods vary by document)."""
    w = [1.0 + 0.1 * (i - (N_PPL - 1) / 2) for i in range(N_PPL)]  # sums to N_PPL
    return [[-math.log(ppl) * 10 * wi, 10.0] for wi in w]


def make_samples(f: ResultsFile) -> dict[str, list[dict]]:
    recs = {}
    for task, outcomes in (("cloze", item_outcomes(f.results["cloze"]["acc,none"])),
                           ("ending", item_outcomes(f.results["ending"]["acc,none"]))):
        recs[task] = [{"task": task, "doc_id": i, "doc_hash": f"h{i}", "filter": "none", "values": {"acc": v}}
                      for i, v in enumerate(outcomes)]
    recs["heldout"] = [{"task": "heldout", "doc_id": i, "doc_hash": f"d{i}", "filter": "none",
                        "values": {"word_perplexity": v}}
                       for i, v in enumerate(ppl_items(f.results["heldout"]["word_perplexity,none"]))]
    return recs


def make_results(recipe: str, acc: tuple[float, float], ppl: float, *, bits: float, seed: int = 0,
                 date: str = "2026-11-23T10:00:00Z", model: str = "tiny", tps: float = 100.0,
                 active: float = 2.0) -> ResultsFile:
    baseline = recipe == "16-bit"
    return ResultsFile(
        suite="unit", model=model, recipe=recipe, seed=seed, date=date,
        results={
            "cloze": {"alias": "cloze", "acc,none": acc[0], "acc_stderr,none": "N/A"},
            "ending": {"alias": "ending", "acc,none": acc[1], "acc_norm,none": acc[1] / 2},
            "heldout": {"alias": "heldout", "word_perplexity,none": ppl, "bits_per_byte,none": 1.0},
        },
        versions={"cloze": 1.0, "ending": 1.0, "heldout": 1.0},
        **{"n-shot": {"cloze": 0, "ending": 0, "heldout": 0}},
        higher_is_better={"cloze": {"acc": True}, "ending": {"acc": True, "acc_norm": True},
                          "heldout": {"word_perplexity": False, "bits_per_byte": False}},
        tasks={
            "cloze": TaskInfo(harness="lm_eval", metric="acc,none", label="Cloze"),
            "ending": TaskInfo(harness="lm_eval", metric="acc,none", label="Ending"),
            "heldout": TaskInfo(harness="lm_eval", metric="word_perplexity,none", label="Held-out"),
        },
        compression=CompressionBlock(
            recipe=recipe, baseline=baseline, nominal_bits=bits, effective_bits=bits + (0 if baseline else 0.25),
            size_bytes=int(1000 * bits), total_params=1000, activated_params_per_token=500.0 * active / 2,
            activated_params_reduction=1 - active / 2,
            active_experts=[LayerActivity(index=i, top_k=2, avg_active_experts=active) for i in range(2)],
            speed=Speed(tokens=256, seconds=256 / tps, tokens_per_second=tps, workload="prefill", device="cpu"),
            quant=None if baseline else {"allocator": "uniform" if recipe.startswith("uniform") else
                                         "pmq+" if recipe.startswith("pmq+") else "pmq",
                                         "target_bits": bits, "bit_set": [1, 2, 3]},
            prune={"method": "odp"} if "ODP" in recipe else None,
        ),
        software={"mcmoe_vl": "0.1.0"},
    )


RUN = [
    make_results("16-bit", (0.80, 0.70), 3.0, bits=16.0, tps=100.0),
    make_results("PMQ 2.5", (0.75, 0.66), 3.5, bits=2.5, tps=150.0),
    make_results("uniform 2", (0.50, 0.45), 9.0, bits=2.0, tps=160.0),
    make_results("PMQ 2.0 + ODP", (0.70, 0.60), 4.0, bits=2.0, tps=190.0, active=1.6),
]


def write_all(d: Path, files: list[ResultsFile], samples: bool = True) -> list[Path]:
    """Each results file with its per-item outputs beside it (as the runner publishes them)."""
    paths = []
    for i, f in enumerate(files):
        p = d / "results" / f"{i:02d}-{f.recipe.replace(' ', '_')}-{f.seed}.json"
        if samples:
            f = f.model_copy(update={"samples": write_samples(samples_path_for(p), make_samples(f))})
        save_results(f, p)
        paths.append(p)
    return paths


def table_rows(md: str, model: str) -> dict[str, dict[str, str]]:
    """The paper-style table of ``model`` as {recipe: {column: cell}}."""
    lines = md.splitlines()
    start = lines.index(f"## {model}")
    first = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("|"))
    tab = []
    for ln in lines[first:]:
        if not ln.startswith("|"):
            break
        tab.append(ln)
    head = [c.strip().split(" n=")[0] for c in tab[0].strip("|").split("|")]
    out = {}
    for ln in tab[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = dict(zip(head, cells))
    return out


def test_report_numbers_equal_the_results_files(tmp_path: Path) -> None:
    paths = write_all(tmp_path, RUN)
    report = build_report(paths, tmp_path / "report")
    md = report.read_text()
    rows = table_rows(md, "tiny")
    assert list(rows) == ["16-bit", "PMQ 2.5", "PMQ 2.0 + ODP", "uniform 2"]  # baseline, then bits down, then name
    base_avg = None
    for p in paths:
        f = json.loads(p.read_text())
        row = rows[f["recipe"]]
        cloze, ending = f["results"]["cloze"]["acc,none"], f["results"]["ending"]["acc,none"]
        se_c = statistics.stdev(item_outcomes(cloze)) / math.sqrt(N_MC)  # direct computation of the standard error
        se_e = statistics.stdev(item_outcomes(ending)) / math.sqrt(N_MC)
        assert row["Cloze"] == f"{100 * cloze:.2f} ± {100 * se_c:.2f}"
        assert row["Ending"] == f"{100 * ending:.2f} ± {100 * se_e:.2f}"
        assert row["Held-out (ppl↓)"].startswith(f"{f['results']['heldout']['word_perplexity,none']:.2f} [")
        avg = statistics.fmean([100 * cloze, 100 * ending])  # perplexity is not in the average
        assert row["Avg"] == f"{avg:.2f} ± {100 * math.hypot(se_c, se_e) / 2:.2f}"
        c = f["compression"]
        assert row["Bits (nominal)"] == f"{c['nominal_bits']:.2f}"
        assert row["Bits (effective)"] == f"{c['effective_bits']:.2f}"
        if f["recipe"] == "16-bit":
            base_avg, base_tps = avg, c["speed"]["tokens_per_second"]
            assert row["Speed-up†"] == "1.00x"  # a 1000-parameter model: marked not meaningful
    for p in paths:
        f = json.loads(p.read_text())
        row = rows[f["recipe"]]
        if f["recipe"] != "16-bit":
            avg = statistics.fmean([100 * f["results"]["cloze"]["acc,none"], 100 * f["results"]["ending"]["acc,none"]])
            assert row["Δ vs 16-bit"] == f"{avg - base_avg:+.2f}"
            assert row["Speed-up†"] == f"{f['compression']['speed']['tokens_per_second'] / base_tps:.2f}x"
    assert "(−20.0%)" in rows["PMQ 2.0 + ODP"]["Activated params"]
    assert "| Cloze n=20 |" in md.replace(" (ppl↓)", "")  # n in the header
    # the paired comparisons: a 27.5-point drop over 20 items per task is real, and the summary says so
    worse = next(ln for ln in md.splitlines() if ln.startswith("- Significantly worse on the average at 95%"))
    assert "uniform 2 vs 16-bit (-27.50 [" in worse
    assert "| uniform 2 | 16-bit |" in md and "**-27.50 [" in md
    assert "† Not meaningful at this size" in md
    assert (tmp_path / "report" / "figures" / "pareto.png").stat().st_size > 1000
    assert "![accuracy against bits](figures/pareto.png)" in md


def test_two_reports_are_byte_identical_whatever_the_file_order(tmp_path: Path) -> None:
    paths = write_all(tmp_path, RUN)
    a = build_report(paths, tmp_path / "a")
    b = build_report(list(reversed(paths)), tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    for fa in sorted((tmp_path / "a" / "figures").iterdir()):
        assert fa.read_bytes() == (tmp_path / "b" / "figures" / fa.name).read_bytes(), fa.name
    # and again into the same directory: same bytes
    assert build_report(paths, tmp_path / "a").read_bytes() == b.read_bytes()


def test_runs_of_different_dates_and_seeds(tmp_path: Path) -> None:
    later = [make_results(f.recipe, (0.9, 0.9), 2.0, bits=f.compression.nominal_bits, date="2026-12-01T08:00:00Z")
             for f in RUN[:2]]
    seeds = [make_results("PMQ 2.5", (0.70, 0.60), 3.5, bits=2.5, seed=1)]
    md = build_report(write_all(tmp_path, RUN + later + seeds), tmp_path / "r").read_text()
    rows = table_rows(md, "tiny")
    assert "16-bit (2026-11-23)" in rows and "16-bit (2026-12-01)" in rows
    # seeds 0 and 1 of the same run are averaged; the standard error adds the seed spread to the item noise
    x0, x1 = item_outcomes(0.75), item_outcomes(0.70)
    item_se2 = statistics.variance([(a + b) / 2 for a, b in zip(x0, x1)]) / N_MC
    seed_se2 = statistics.variance([0.75, 0.70]) / 2
    se = math.sqrt(item_se2 + seed_se2)
    assert rows["PMQ 2.5 (2026-11-23)"]["Cloze"] == f"{100 * (0.75 + 0.70) / 2:.2f} ± {100 * se:.2f}"
    assert rows["PMQ 2.5 (2026-11-23)"]["Seeds"] == "2"
    assert f"| PMQ 2.5 | 2 | {100 * statistics.stdev([0.75, 0.70]):.2f} |" in md  # the seed-spread table
    # each run is compared with the baseline of its own date
    assert rows["PMQ 2.5 (2026-12-01)"]["Δ vs 16-bit"] == "+0.00"


def test_duplicate_seed_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="seed"):
        build_report(write_all(tmp_path, RUN + [RUN[1]]), tmp_path / "r")


def test_results_of_another_schema_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "lm_eval_output.json"
    plain.write_text(json.dumps({"results": {"cloze": {"acc,none": 0.5}}, "versions": {}}))
    with pytest.raises(ResultsSchemaError, match="plain lm-eval / lmms-eval output"):
        load_results(plain)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "mcmoe_vl.results/0", "results": {}}))
    with pytest.raises(ResultsSchemaError, match="found schema 'mcmoe_vl.results/0'"):
        load_results(other)
    good = write_all(tmp_path, RUN[:1])[0]
    data = json.loads(good.read_text())
    data["compression"]["nominal_bits"] = "sixteen"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ResultsSchemaError, match="compression.nominal_bits"):
        load_results(bad)
    trunc = tmp_path / "trunc.json"
    trunc.write_text(good.read_text()[:100])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(trunc)
    # a report refuses before writing anything
    with pytest.raises(ResultsSchemaError):
        build_report([good, plain], tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert data["schema"] == RESULTS_SCHEMA


def test_primary_metric_choice() -> None:
    assert primary_metric({"acc,none": 0.5, "acc_norm,none": 0.6, "acc_stderr,none": 0.1}) == "acc_norm,none"
    assert primary_metric({"exact_match,strict-match": 0.1, "exact_match,flexible": 0.2}) == "exact_match,flexible"
    assert primary_metric({"acc,none": 0.5}, "acc") == "acc,none"
    with pytest.raises(ValueError, match="not in the task's results"):
        primary_metric({"acc,none": 0.5}, "f1")


def test_pareto_front() -> None:
    pts = [(16, 80.0), (2.5, 75.0), (2.0, 70.0), (2.0, 50.0), (3.0, 60.0), (1.5, 40.0)]
    assert pareto_front(pts) == [(1.5, 40.0), (2.0, 70.0), (2.5, 75.0), (16, 80.0)]


def test_pareto_labels_do_not_collide() -> None:
    ys = [50.0, 50.1, 50.15, 70.0, 49.9]
    placed = spread_labels(ys, 1.0, 40.0, 80.0)
    srt = sorted(placed)
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(srt, srt[1:]))
    assert all(40.0 <= p <= 80.0 for p in placed)
    assert placed[3] == 70.0  # a label with room stays where its point is
    # crowded at the top: the stack is shifted down to stay inside the axis
    top = spread_labels([79.9, 79.95, 80.0], 1.0, 40.0, 80.0)
    assert max(top) <= 80.0 and sorted(top)[1] - sorted(top)[0] >= 1.0 - 1e-9


def test_heatmaps_only_for_non_uniform_plans_and_significance_named_after_the_model(tmp_path: Path) -> None:
    from PIL import Image

    art = tmp_path / "art"
    art.mkdir()
    for i, name in enumerate(["sig.png", "alloc_pmq.png", "alloc_uniform.png"]):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(art / name)
    files = []
    for f, plan, alloc in ((RUN[1], {"0": [1, 2, 3, 2]}, "alloc_pmq.png"),
                           (RUN[2], {"0": [2, 2, 2, 2]}, "alloc_uniform.png")):
        c = f.compression.model_copy(update={
            "quant": f.compression.quant.model_copy(update={"plan": plan}),
            "artifacts": {"significance_heatmap": "../art/sig.png", "allocation_heatmap": f"../art/{alloc}"}})
        files.append(f.model_copy(update={"compression": c}))
    paths = []
    for f in [RUN[0], RUN[3]] + files:
        p = tmp_path / "results" / f"{f.recipe.replace(' ', '_')}.json"
        save_results(f, p)
        paths.append(p)
    md = build_report(paths, tmp_path / "r").read_text()
    assert "figures/tiny-significance-heatmap.png" in md and md.count("**tiny: expert significance") == 1
    assert "tiny: allocation heatmap, PMQ 2.5" in md
    assert "allocation heatmap, uniform 2" not in md
    # the active-experts plot shows the pruned recipe only
    assert "| PMQ 2.0 + ODP | 1.60 | 1.60 | 2 |" in md and "| 16-bit | 2.00" not in md


def test_altered_or_missing_per_item_outputs_are_refused(tmp_path: Path) -> None:
    from mcmoe_vl.evaluation.samples import SamplesError

    paths = write_all(tmp_path, RUN)
    side = samples_path_for(paths[1])
    side.write_text(side.read_text().replace('"acc": 0.0', '"acc": 1.0', 1))
    with pytest.raises(SamplesError, match="SHA-256 differs"):
        build_report(paths, tmp_path / "r")
    assert not (tmp_path / "r").exists()  # refused before writing anything
    side.unlink()
    with pytest.raises(SamplesError, match="are missing"):
        build_report(paths, tmp_path / "r")


def test_results_without_per_item_outputs_still_report_and_say_so(tmp_path: Path) -> None:
    md = build_report(write_all(tmp_path, RUN, samples=False), tmp_path / "r").read_text()
    assert table_rows(md, "tiny")["PMQ 2.5"]["Cloze"] == "75.00"
    assert "carry no per-item outputs, so no uncertainty is shown" in md
    assert "Paired differences" not in md


def test_pmq_plus_rows_are_also_compared_with_the_papers_pmq_at_the_same_bits(tmp_path: Path) -> None:
    run = RUN + [make_results("pmq+ 2.5", (0.78, 0.68), 3.2, bits=2.5), make_results("pmq+ 1.5", (0.6, 0.5), 5.0,
                                                                                      bits=1.5)]
    md = build_report(write_all(tmp_path, run), tmp_path / "report").read_text()
    paired = [[c.strip() for c in ln.split("|")[1:3]] for ln in md.splitlines()
              if ln.startswith("| ") and ln.count("|") > 3 and not ln.split("|")[2].strip().isdigit()]
    assert [p for p in paired if p[0].startswith("pmq+")] == [["pmq+ 2.5", "16-bit"], ["pmq+ 2.5", "PMQ 2.5"],
                                                              ["pmq+ 1.5", "16-bit"]]  # no PMQ 1.5 row to compare
    assert ["PMQ 2.5", "pmq+ 2.5"] not in paired  # one direction only


def test_recipes_that_differ_only_by_plus_get_their_own_figures(tmp_path: Path) -> None:
    plan_a = {"0": [1, 3, 2, 2], "1": [2, 2, 2, 2]}
    plan_b = {"0": [3, 1, 2, 2], "1": [2, 2, 2, 2]}
    files = []
    for recipe, plan in (("PMQ 1.5", plan_a), ("pmq+ 1.5", plan_b)):
        f = make_results(recipe, (0.6, 0.5), 5.0, bits=1.5)
        png = tmp_path / "art" / f"{recipe}.png"
        png.parent.mkdir(exist_ok=True)
        png.write_bytes(b"\\x89PNG" + recipe.encode())  # distinct pictures
        f.compression.quant.plan = plan
        f.compression.artifacts = {"allocation_heatmap": str(png)}
        files.append(f)
    md = build_report(write_all(tmp_path, files), tmp_path / "report").read_text()
    figs = sorted(p.name for p in (tmp_path / "report" / "figures").glob("*allocation*"))
    assert figs == ["tiny-pmq-1.5-allocation-heatmap.png", "tiny-pmqplus-1.5-allocation-heatmap.png"], figs
    assert "figures/tiny-pmqplus-1.5-allocation-heatmap.png" in md
