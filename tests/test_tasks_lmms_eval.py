"""The offline lmms-eval suite runs with no network on the embedded DeepSeek-VL2 model instance (lmms-eval 0.7):
every task builds from the local files wherever the repository is, generation tasks score exact match, and
multiple-choice tasks score accuracy above chance for the trained model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

pytest.importorskip("lmms_eval")

from mcmoe_vl.data.embedded import load_embedded_vlm  # noqa: E402
from mcmoe_vl.data.tasks import (OFFLINE_VQA_GEN_TASKS, OFFLINE_VQA_GROUP, OFFLINE_VQA_MC_TASKS,  # noqa: E402
                                 OFFLINE_VQA_TASKS, lmms_task_manager)

CHANCE = {"colour": 1 / 8, "shape": 1 / 5, "count": 1 / 5, "digit": 1 / 10, "reading": 1 / 10, "position": 1 / 4}
LIMIT = 8


def test_task_manager_finds_the_suite():
    tm = lmms_task_manager()
    assert OFFLINE_VQA_GROUP in tm.all_tasks and set(OFFLINE_VQA_TASKS) <= set(tm.all_tasks)


def test_suite_runs_offline_above_chance(tmp_path, monkeypatch):
    from lmms_eval import evaluator

    from model_adapters.deepseek_vl2.lmms_model import DeepseekVL2LMMS

    monkeypatch.chdir(tmp_path)  # data paths must not depend on the working directory
    model, processor = load_embedded_vlm()
    lm = DeepseekVL2LMMS(model, processor, batch_size=8, max_new_tokens=8)
    res = evaluator.simple_evaluate(model=lm, tasks=list(OFFLINE_VQA_TASKS), limit=LIMIT,
                                    task_manager=lmms_task_manager(), batch_size=8)["results"]
    assert set(OFFLINE_VQA_TASKS) <= set(res)
    for task in OFFLINE_VQA_GEN_TASKS:
        assert 0.0 <= res[task]["exact_match,none"] <= 1.0
    above = [t for t in OFFLINE_VQA_TASKS
             if res[t].get("exact_match,none", res[t].get("acc,none")) > CHANCE[t.split("_")[2]] + 0.15]
    assert len(above) >= 5, res
    assert res["mcmoe_vqa_position_mc"]["acc,none"] >= 0.75, res
