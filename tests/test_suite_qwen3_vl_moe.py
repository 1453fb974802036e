"""The second vision-language family end to end through the unchanged suite: a tiny random Qwen3-VL-MoE checkpoint
with deepstack visual features (replayed by the layer-by-layer passes, as in released checkpoints), image+text
calibration (statistics split by image and text tokens), PMQ, GPTQ with save / load, ODP and OTP, and
lmms-eval on two of the offline image tasks (one generated answer, one multiple choice)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image
from tiny_models import tiny_qwen3_vl_moe, tiny_qwen3_vl_tokenizer

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by scripts/setup.sh")

from mcmoe_vl.evaluation.results import load_results  # noqa: E402
from mcmoe_vl.suite.load import load_suite  # noqa: E402
from mcmoe_vl.suite.runner import run_suite  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "tasks" / "lmms_eval"


def _calibration(root: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        lines.append(json.dumps({"text": "What colour is the shape?" + " Look closely." * (i % 2),
                                 "image": f"img{i}.png", "answer": "red"}))
    (root / "calib.jsonl").write_text("\n".join(lines))


def test_qwen3_vl_moe_suite_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    model = tiny_qwen3_vl_moe()
    assert model.config.vision_config.deepstack_visual_indexes  # image calibration goes through the deepstack replay
    model.save_pretrained(tmp_path / "q3vl")
    tiny_qwen3_vl_tokenizer().save_pretrained(tmp_path / "q3vl")
    _calibration(tmp_path)
    suite = {
        "name": "tiny qwen3 vl",
        "torch_threads": 1,
        "models": [{"name": "tiny-q3vl", "checkpoint": "q3vl", "adapter": "qwen3_vl_moe",
                    "calibration_data": "calib.jsonl"}],
        "recipes": [{"name": "16-bit"},
                    {"name": "GPTQ 2-bit", "quant": {"method": "uniform", "target_bits": 2, "group_size": 8}},
                    {"name": "PMQ 2.0", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 8}},
                    {"name": "PMQ 2.0 + ODP", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 8},
                     "prune": {"method": "odp", "prune_rate": 0.2, "protect_ratio": 0.0}},
                    {"name": "PMQ 2.0 + OTP", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 8},
                     "prune": {"method": "otp", "prune_rate": 0.2, "steps": 3}}],
        "tasks": [{"harness": "lmms_eval", "name": "mcmoe_vqa_colour", "limit": 2},
                  {"harness": "lmms_eval", "name": "mcmoe_vqa_digit_mc", "limit": 2}],
        "calibration": {"num_sequences": 6, "batch_size": 3, "eps_bits": [1, 2, 3], "min_tokens": 1},
        "evaluation": {"lmms_eval_include": [str(TASKS)], "batch_size": 1, "speed_tokens": 0},
        "run_dir": str(tmp_path / "runs"),
        "report": {"output_dir": str(tmp_path / "report"), "bootstrap": 100},
    }
    (tmp_path / "suite.toml").write_text(tomli_w.dumps(suite))
    summary = run_suite(load_suite(tmp_path / "suite.toml"), progress=False)
    assert summary.failed == [] and summary.not_run == [], summary.notes
    res = {load_results(p).recipe: load_results(p) for p in summary.results}
    assert set(res) == {"16-bit", "GPTQ 2-bit", "PMQ 2.0", "PMQ 2.0 + ODP", "PMQ 2.0 + OTP"}
    for r in res.values():
        for task in ("mcmoe_vqa_colour", "mcmoe_vqa_digit_mc"):
            assert r.tasks[task].harness == "lmms_eval" and 0.0 <= r.score(task) <= 1.0
    stats = json.loads((tmp_path / "runs" / "calibrate" / res["PMQ 2.0"].config["stage_keys"]["calibrate"]
                        / "stats.json").read_text())
    for la in stats["layers"]:
        assert la["image"]["num_tokens"] > 0 and la["text"]["num_tokens"] > 0  # image and text statistics
    assert res["PMQ 2.0"].compression.nominal_bits < 16 and res["GPTQ 2-bit"].compression.quant.bit_set == [2]
    assert res["PMQ 2.0 + ODP"].compression.prune.method == "odp"
    assert res["PMQ 2.0 + OTP"].compression.prune.method == "otp"
    assert summary.report is not None and "PMQ 2.0 + OTP" in summary.report.read_text()
