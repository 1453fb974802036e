"""The harness command lines run a compressed checkpoint written by the suite, in a subprocess, and score exactly
what the suite scored for the same recipe (lm-eval through `mcmoe-vl eval`; lmms-eval's stock command through
its entry-point group)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from mcmoe_vl.evaluation.results import load_results
from mcmoe_vl.quant.checkpoint import MANIFEST_FILE
from mcmoe_vl.suite.load import load_suite
from mcmoe_vl.suite.runner import run_suite

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    parts = [str(ROOT)] + ([str(extra_path)] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


def _checkpoint_of(runs: Path, res) -> Path:
    key = res.config["stage_keys"]["quantize"]
    d = runs / "quantize" / key / "checkpoint"
    assert (d / MANIFEST_FILE).is_file() and (d / "config.json").is_file(), sorted(os.listdir(d))
    return d


def _harness_scores(out: Path) -> dict:
    files = sorted(out.rglob("*results*.json"))
    assert files, f"the harness wrote no results under {out}"
    return json.loads(files[-1].read_text())["results"]


def _assert_same_metrics(got: dict, want: dict) -> None:
    metrics = [k for k in want if "," in k and "stderr" not in k and isinstance(want[k], (int, float))]
    assert metrics, want
    assert {k: got[k] for k in metrics} == {k: want[k] for k in metrics}


def test_lm_eval_cli_scores_equal_the_suite(tmp_path: Path) -> None:
    from test_suite_run import write_suite

    recipe = {"name": "PMQ 2.0", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 16}}
    suite = write_suite(tmp_path, [recipe], tasks=[{"harness": "lm_eval", "name": "t8_parity", "limit": 6}],
                        evaluation={"lm_eval_include": ["tasks"], "batch_size": 4, "speed_tokens": 0})
    summary = run_suite(load_suite(suite), progress=False)
    assert summary.failed == [], summary.notes
    res = load_results(summary.results[0])
    ckpt = _checkpoint_of(tmp_path / "runs", res)
    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "mcmoe_vl.cli", "eval", str(ckpt), "--tasks", "t8_parity", "--limit", "6",
           "--batch-size", "4", "--include-path", str(tmp_path / "tasks"), "--runtime", "fake",
           "--", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _harness_scores(out)["t8_parity"]
    _assert_same_metrics(got, res.results["t8_parity"])
    assert "mcmoe" in proc.stdout  # lm-eval's own summary names the model


def _entry_point_dist(root: Path) -> Path:
    """A dist-info declaring the package's lmms_eval.models entry point, as an installed copy would (the shared
    environment's editable install predates the entry point; pyproject.toml declares the same one)."""
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    d = root / "site" / "mcmoe_vl_entry_points-0.0.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: mcmoe-vl-entry-points\nVersion: 0.0\n")
    (d / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return root / "site"


def test_lmms_eval_cli_scores_equal_the_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lmms_eval")
    from test_suite_vlm import _calibration, _checkpoint, _tasks

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    _checkpoint(tmp_path / "vl2")
    tasks = _tasks(tmp_path)
    _calibration(tmp_path)
    suite = {
        "name": "tiny vlm", "torch_threads": 1,
        "models": [{"name": "tiny-vl2", "checkpoint": "vl2", "adapter": "deepseek_vl_v2",
                    "calibration_data": "calib.jsonl"}],
        "recipes": [{"name": "PMQ 2.0", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 32}}],
        "tasks": [{"harness": "lmms_eval", "name": "s8_colour"}],
        "calibration": {"num_sequences": 6, "batch_size": 3, "eps_bits": [1, 2, 3], "min_tokens": 1},
        "evaluation": {"lmms_eval_include": ["lmms_tasks"], "batch_size": 3, "speed_tokens": 0},
        "run_dir": str(tmp_path / "runs"), "report": {"output_dir": str(tmp_path / "report")},
    }
    (tmp_path / "suite.toml").write_text(tomli_w.dumps(suite))
    summary = run_suite(load_suite(tmp_path / "suite.toml"), progress=False)
    assert summary.failed == [], summary.notes
    res = load_results(summary.results[0])
    ckpt = _checkpoint_of(tmp_path / "runs", res)
    out = tmp_path / "lmms_out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mcmoe", "--model_args",
           f"pretrained={ckpt},runtime=fake", "--tasks", "s8_colour", "--include_path", str(tasks),
           "--batch_size", "3", "--output_path", str(out)]
    env = dict(_env(_entry_point_dist(tmp_path)), HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    _assert_same_metrics(_harness_scores(out)["s8_colour"], res.results["s8_colour"])
