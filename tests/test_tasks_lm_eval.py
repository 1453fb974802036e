"""The offline lm-eval suite runs with no network through lm-eval's own HF model on an in-memory model: the trained
embedded Mixtral is well above chance on the multiple-choice tasks, a random-weight copy is near chance, and the
perplexity tasks report word / byte perplexity with code (out-of-domain) above docstrings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mcmoe_vl.data.embedded import load_embedded_mixtral  # noqa: E402
from mcmoe_vl.data.tasks import OFFLINE_TEXT_GROUP, OFFLINE_TEXT_MC_TASKS, OFFLINE_TEXT_PPL_TASKS, text_task_manager  # noqa: E402,E501

MC_LIMIT = 40


def _run(model, tok, tasks, limit):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16, max_length=256)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=text_task_manager(),
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return out["results"]


@pytest.fixture(scope="module")
def trained():
    return load_embedded_mixtral()


def test_task_manager_finds_the_suite():
    tm = text_task_manager()
    names = set(tm.all_tasks)
    assert OFFLINE_TEXT_GROUP in names and set(OFFLINE_TEXT_MC_TASKS + OFFLINE_TEXT_PPL_TASKS) <= names


def test_trained_model_far_above_chance_random_model_near_it(trained):
    from transformers import MixtralForCausalLM

    model, tok = trained
    res = _run(model, tok, OFFLINE_TEXT_MC_TASKS, MC_LIMIT)
    torch.manual_seed(0)
    rand = MixtralForCausalLM(model.config).eval()
    res_rand = _run(rand, tok, OFFLINE_TEXT_MC_TASKS, MC_LIMIT)
    # length-normalised accuracy (acc_norm): raw log-likelihood favours short choices, which is what a random model
    # does; chance is 0.25 (four choices)
    accs = {t: res[t]["acc_norm,none"] for t in OFFLINE_TEXT_MC_TASKS}
    for task in OFFLINE_TEXT_MC_TASKS:
        acc, acc_rand = accs[task], res_rand[task]["acc_norm,none"]
        assert acc > acc_rand, (task, acc, acc_rand)
        assert res_rand[task]["acc,none"] <= 0.45, (task, res_rand[task])  # random weights: near chance
    assert min(accs["mcmoe_docstring_cloze"], accs["mcmoe_docstring_word_order"]) >= 0.5, accs  # far above 0.25
    assert sum(accs.values()) / len(accs) >= 0.45, accs  # the ending task is the hardest (about 0.4)
    rand_mean = sum(res_rand[t]["acc,none"] for t in OFFLINE_TEXT_MC_TASKS) / len(OFFLINE_TEXT_MC_TASKS)
    assert abs(rand_mean - 0.25) <= 0.1, res_rand


def test_perplexity_tasks(trained):
    model, tok = trained
    res = _run(model, tok, OFFLINE_TEXT_PPL_TASKS, 12)
    src, prose = res["mcmoe_source_ppl"], res["mcmoe_prose_ppl"]
    for r in (src, prose):
        assert r["byte_perplexity,none"] > 1.0 and r["word_perplexity,none"] > r["byte_perplexity,none"]
    assert src["byte_perplexity,none"] < 8.0
    assert prose["byte_perplexity,none"] > 1.1 * src["byte_perplexity,none"]  # out of domain
