"""lm-eval on an in-memory model: scores equal a direct computation with the same (modified) model."""

from __future__ import annotations

import os
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from mcmoe_vl.evaluation.lm_eval_backend import TaskRequest, evaluate_lm_eval

DATA = Path(__file__).parent / "data" / "suite"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from test_suite_run import tiny_checkpoint
    from transformers import AutoModelForCausalLM

    from mcmoe_vl.data.tokenizer import byte_tokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    tasks = root / "tasks"
    shutil.copytree(DATA / "tasks", tasks)
    for f in tasks.glob("*.yaml"):
        f.write_text(f.read_text().replace("DATA_DIR", str(tasks)))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint(root / "ckpt"))).eval()
    return model, byte_tokenizer(model_max_length=256), tasks


def _logprob(model, tok, prefix_ids: list[int], cont_ids: list[int]) -> float:
    ids = torch.tensor([prefix_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (S, V)
    n = len(prefix_ids)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(cont_ids)))


def reference_scores(model, tok, tasks: Path, limit_mc: int, limit_ppl: int) -> tuple[float, float]:
    """acc of the parity task and word perplexity of the words task, computed directly (float64)."""
    docs = [json.loads(x) for x in (tasks / "parity.jsonl").read_text().splitlines()][:limit_mc]
    correct = 0
    for d in docs:
        ctx = tok(d["context"], add_special_tokens=False)["input_ids"]
        lls = [_logprob(model, tok, ctx, tok(" " + c, add_special_tokens=False)["input_ids"]) for c in d["choices"]]
        correct += int(max(range(len(lls)), key=lambda i: lls[i]) == d["label"])
    texts = [json.loads(x)["text"] for x in (tasks / "words.jsonl").read_text().splitlines()][:limit_ppl]
    total_ll = sum(_logprob(model, tok, [tok.bos_token_id], tok(t, add_special_tokens=False)["input_ids"])
                   for t in texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    return correct / len(docs), math.exp(-total_ll / words)


def test_scores_equal_a_direct_computation_on_the_in_memory_model(setup) -> None:
    model, tok, tasks = setup
    # modify the model in memory: lm-eval must see this model, not a reload of the checkpoint
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj.mul_(1.5)
    reqs = [TaskRequest("t8_parity", num_fewshot=0, limit=10), TaskRequest("t8_words", limit=4)]
    out = evaluate_lm_eval(model, tok, reqs, include_paths=[tasks], batch_size=4)
    acc, ppl = reference_scores(model, tok, tasks, 10, 4)
    assert out["results"]["t8_parity"]["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert out["results"]["t8_words"]["word_perplexity,none"] == pytest.approx(ppl, rel=1e-4)
    assert 1.0 < ppl < 1e30  # not vacuous: a finite, non-trivial perplexity
    assert out["n-shot"] == {"t8_parity": 0, "t8_words": 0}
    assert out["higher_is_better"]["t8_words"]["word_perplexity"] is False
    assert out["n-samples"]["t8_parity"]["effective"] == 10


def test_a_task_can_run_twice_under_its_own_key(setup) -> None:
    model, tok, tasks = setup
    reqs = [TaskRequest("t8_parity", num_fewshot=0, limit=4),
            TaskRequest("t8_parity", num_fewshot=2, limit=4, key="t8_parity_2shot")]
    out = evaluate_lm_eval(model, tok, reqs, include_paths=[tasks], batch_size=4)
    assert set(out["results"]) == {"t8_parity", "t8_parity_2shot"}
    assert out["n-shot"] == {"t8_parity": 0, "t8_parity_2shot": 2}


def test_harnesses_see_no_process_group_or_rank(tmp_path, monkeypatch) -> None:
    """Under torchrun each process evaluates its own recipe: the harnesses must not see the runner's process group
    (lmms-eval's evaluator would barrier with processes busy on other recipes) nor its rank variables."""
    import torch.distributed as dist

    from mcmoe_vl.evaluation.lm_eval_backend import single_process_view

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        with single_process_view():
            assert not dist.is_initialized()
            assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
        assert dist.is_initialized() and os.environ["RANK"] == "1"
    finally:
        dist.destroy_process_group()
