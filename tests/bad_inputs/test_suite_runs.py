"""Bad inputs to a suite run: artifacts edited, truncated or left over from another recipe are never trusted.

One tiny suite (a random Mixtral, one quantized recipe) is run once per module; each case then damages the run
directory the way a user (or a crash) would and re-runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_suite_run import write_suite

from mcmoe_vl.allocation.budget import AllocationError
from mcmoe_vl.evaluation.results import load_results
from mcmoe_vl.suite import stages
from mcmoe_vl.suite.load import load_suite
from mcmoe_vl.suite.runner import run_suite

RECIPE = {"name": "Q", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 16}}


def _run(suite: Path, **kw):
    return run_suite(load_suite(suite), progress=False, **kw)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    suite = write_suite(root, [RECIPE], report={"output_dir": str(root / "report"), "heatmaps": False})
    summary = _run(suite)
    assert summary.failed == [] and len(summary.results) == 1
    res = load_results(summary.results[0])
    stats = root / "runs" / "calibrate" / res.config["stage_keys"]["calibrate"] / "stats.json"
    return root, suite, summary.results[0], stats, stats.read_bytes()


@pytest.fixture
def fresh_copy(first, tmp_path):
    """A private copy of the first run (the cases damage it)."""
    root, suite, published, stats, original = first
    shutil.copytree(root / "runs", tmp_path / "runs")
    shutil.copytree(root / "tasks", tmp_path / "tasks")  # its YAML points at the first run's data: the same tasks
    shutil.copy(root / "calib.txt", tmp_path / "calib.txt")
    # the same checkpoint path (it is part of the stage keys), run and report directories in the copy
    text = suite.read_text().replace(str(root), str(tmp_path)).replace('checkpoint = "ckpt"',
                                                                       f'checkpoint = "{root / "ckpt"}"')
    (tmp_path / "suite.toml").write_text(text)
    return tmp_path, tmp_path / published.relative_to(root), tmp_path / stats.relative_to(root), original


def _edit_eps(path: Path) -> None:
    data = json.loads(path.read_text())
    data["layers"][0]["eps"]["1"] = [v * 100 for v in data["layers"][0]["eps"]["1"]]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("record", ["kept", "removed"])
def test_hand_edited_statistics_are_recomputed_not_reused(fresh_copy, record):
    """Item 3: an edited stats.json (with or without its completion record) is redone from scratch."""
    root, _, stats, original = fresh_copy
    _edit_eps(stats)
    if record == "removed":  # looks like an interrupted pass: resume must still refuse the edited file
        (stats.parent / "stage.json").unlink()
    summary = _run(root / "suite.toml")
    assert summary.failed == [] and summary.computed.get("calibrate") == 1
    assert stats.read_bytes() == original  # recomputed, identical to the untouched run


@pytest.mark.parametrize("record", ["kept", "removed"])
def test_truncated_statistics_are_redone_not_blocking(fresh_copy, record):
    """Item 8: a truncated stats.json is redone like every other stage artifact."""
    root, _, stats, original = fresh_copy
    stats.write_bytes(original[: len(original) // 2])
    if record == "removed":
        (stats.parent / "stage.json").unlink()
    summary = _run(root / "suite.toml")
    assert summary.failed == [], summary.notes
    assert stats.read_bytes() == original


def test_failed_recipe_moves_its_old_results_aside(fresh_copy, monkeypatch):
    """Item 4: a recipe that fails under an existing name leaves no results file that a report would read."""
    root, published, _, _ = fresh_copy
    suite = root / "suite.toml"
    suite.write_text(suite.read_text().replace("bits = 2.0", "bits = 2.5"))  # changed recipe, same name

    def infeasible(*a, **k):
        raise AllocationError("layer 0: target outside the reachable range")

    monkeypatch.setattr(stages, "allocate", infeasible)
    summary = _run(suite)
    assert summary.failed == ["tiny-mixtral / Q / seed 0"]
    assert not published.exists()
    stale = root / "runs" / "results.stale" / published.relative_to(root / "runs" / "results")
    assert stale.is_file()
    assert not list((root / "runs" / "results").rglob("*.json"))


def test_recipe_removed_from_the_suite_moves_its_results_aside(fresh_copy):
    root, published, _, _ = fresh_copy
    suite = root / "suite.toml"
    suite.write_text(suite.read_text().replace(
        '{ name = "Q", quant = { method = "pmq", target_bits = 2.0, group_size = 16 } }', '{ name = "16-bit" }'))
    load_suite(suite)  # still a valid suite: one 16-bit recipe
    summary = _run(suite)
    assert summary.failed == []
    assert not published.exists()
    assert (root / "runs" / "results.stale" / published.relative_to(root / "runs" / "results")).is_file()


def test_recipe_changed_to_an_infeasible_one_is_refused_and_its_results_moved_aside(fresh_copy):
    """Item 4 as reported: same name, bits changed to an infeasible value; `run` refuses before any work (item 6)
    and the results of the old definition no longer sit in results/ for `mcmoe-vl report` to show."""
    from mcmoe_vl.suite.load import SuiteError

    root, published, _, _ = fresh_copy
    suite = root / "suite.toml"
    suite.write_text(suite.read_text().replace("bits = 2.0", "bits = 0.5"))
    with pytest.raises(SuiteError, match="recipe 'Q'.*outside the reachable range"):
        _run(suite)
    assert not published.exists()
    assert (root / "runs" / "results.stale" / published.relative_to(root / "runs" / "results")).is_file()


def test_unchanged_recipe_keeps_its_results(fresh_copy):
    root, published, _, _ = fresh_copy
    summary = _run(root / "suite.toml")
    assert summary.failed == [] and "calibrate" not in summary.computed
    assert published.is_file() and not (root / "runs" / "results.stale").exists()


def test_import_error_inside_the_project_fails_the_recipe_loudly(fresh_copy, monkeypatch):
    """Issue 18: only the optional lmms-eval may be "unavailable"; an ImportError raised by this project's own code
    (here: the quantization stage) is a failure the run reports (exit code 1), never a silently skipped recipe."""
    root, published, _, _ = fresh_copy
    suite = root / "suite.toml"
    suite.write_text(suite.read_text().replace("bits = 2.0", "bits = 2.5"))  # the quantize stage must run again

    def broken(*a, **k):
        raise ImportError("cannot import name 'missing' from 'mcmoe_vl.quant.model'")

    monkeypatch.setattr(stages, "quantize", broken)
    summary = _run(suite)
    assert summary.failed == ["tiny-mixtral / Q / seed 0"] and summary.not_run == []
    assert any("ImportError" in n for n in summary.notes)


def test_suite_schema_uses_the_library_enums():
    """One enum per concept: the suite file's closed choices are the library's own types."""
    from mcmoe_vl.allocation.budget import BudgetKind
    from mcmoe_vl.allocation.config import Scope
    from mcmoe_vl.pruning.artifact import PruningMethod
    from mcmoe_vl.quant.qlinear import Runtime
    from mcmoe_vl.suite.schema import EvaluationSpec, RecipeSpec

    r = RecipeSpec(name="r", quant={"method": "pmq", "target_bits": 2.0, "budget": "effective", "scope": "global"},
                   prune={"method": "otp"})
    assert r.quant.allocation.budget is BudgetKind.EFFECTIVE and r.quant.allocation.scope is Scope.GLOBAL
    assert r.prune.method is PruningMethod.OTP
    assert EvaluationSpec(runtime="packed").runtime is Runtime.PACKED
