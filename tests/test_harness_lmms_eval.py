"""The lmms-eval model ``mcmoe`` serves a directory of any registered vision-language family through its adapter:
built from a compressed checkpoint (DeepSeek-VL2 and Qwen3-VL-MoE) it is the adapter's own lmms-eval model and
answers the offline image tasks exactly as that model does around the quantized model in memory; the pruning
settings follow ``apply_pruning``; an original checkpoint loads through ``adapter.load_model``."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from compressed_vlm import VLM_FAMILIES, compressed_vlm
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by scripts/setup.sh")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402

from mcmoe_vl.evaluation.harness_lmms_eval import McMoeLMMS  # noqa: E402
from mcmoe_vl.evaluation.lm_eval_backend import TaskRequest  # noqa: E402
from mcmoe_vl.evaluation.lmms_eval_backend import evaluate_lmms_eval  # noqa: E402
from mcmoe_vl.hf.quantizer import apply_saved_pruning  # noqa: E402
from mcmoe_vl.quant.checkpoint import PRUNING_FILE  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "tasks" / "lmms_eval"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
DOCS = [{"question": f"What colour is the picture? Answer {c}.", "colour": c} for c in COLOURS]


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def compressed(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "q"
    adapter, model, processor, _ = compressed_vlm(request.param, out)
    return adapter, model, processor, out


def _visual(doc):
    rng = np.random.default_rng(len(doc["colour"]))
    px = np.clip(np.array(COLOURS[doc["colour"]]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255)
    return [Image.fromarray(px.astype(np.uint8))]


def _scores(lm) -> list[tuple[float, bool]]:
    """(negative log-likelihood, greedy) of each colour after each picture's question."""
    lm.task_dict = {"t": {"test": DOCS}}
    reqs = [Instance("loglikelihood", (d["question"], " " + c, _visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(DOCS) for c in COLOURS]
    return [r.text for r in lm.loglikelihood(reqs)]


def _evaluate(lm) -> dict:
    tasks = [TaskRequest("mcmoe_vqa_colour", None, 3, None), TaskRequest("mcmoe_vqa_digit_mc", None, 3, None)]
    out = evaluate_lmms_eval(lm, None, tasks, include_paths=[TASKS], batch_size=1)
    return {"results": out["results"], "samples": out["samples"]}


def test_harness_model_answers_as_the_adapters_model_in_memory(compressed, tmp_path, monkeypatch):
    adapter, model, processor, ckpt = compressed
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    # model_args arrive as strings from lmms-eval's command line
    lm = McMoeLMMS(pretrained=str(ckpt), apply_pruning="false", batch_size="1", max_new_tokens="4")
    ref = adapter.lmms_model(model, processor, batch_size=1, max_new_tokens=4)
    assert isinstance(lm, lmms) and type(lm) is type(ref) and lm.model is not model
    assert lm.model.mcmoe_pruning is None
    assert sum(type(m).__name__ in ("QuantLinear", "QuantExperts") for m in lm.model.modules()) > 0
    got, want = _scores(lm), _scores(ref)
    assert got == want and len({round(s, 4) for s, _ in want}) > 1  # equal, and not a constant
    evaluated = _evaluate(lm)
    assert evaluated == _evaluate(ref)
    assert {r["task"] for recs in evaluated["samples"].values() for r in recs} == {"mcmoe_vqa_colour",
                                                                                  "mcmoe_vqa_digit_mc"}


def test_pruning_settings_follow_apply_pruning(compressed):
    adapter, model, processor, ckpt = compressed
    pruned = McMoeLMMS(pretrained=str(ckpt), max_new_tokens=4)  # apply_pruning defaults to true
    assert pruned.model.mcmoe_pruning is not None
    in_memory = copy.deepcopy(model)
    assert apply_saved_pruning(in_memory, ckpt / PRUNING_FILE) is not None
    want = _scores(adapter.lmms_model(in_memory, processor, max_new_tokens=4))
    assert _scores(pruned) == want
    assert want != _scores(McMoeLMMS(pretrained=str(ckpt), apply_pruning=False))  # pruning changes the answers


def test_original_directory_loads_through_the_adapter(tmp_path):
    from tiny_models import tiny_qwen3_vl_moe, tiny_qwen3_vl_tokenizer

    from model_adapters import get_adapter

    model, tok = tiny_qwen3_vl_moe(seed=3), tiny_qwen3_vl_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(str(tmp_path))
    adapter = get_adapter(model)
    lm = McMoeLMMS(pretrained=str(tmp_path), device="cpu")
    assert type(lm.model) is type(model) and not hasattr(lm.model, "mcmoe_pruning")
    got = _scores(lm)
    want = _scores(adapter.lmms_model(model.eval(), adapter.load_processor(tok, model)))
    # transformers picks its default attention kernel on loading (the tiny model in memory runs eager attention)
    assert [g for _, g in got] == [g for _, g in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)


def test_refusals_name_what_is_valid(compressed, tmp_path):
    from tiny_models import tiny_mixtral

    _, _, _, ckpt = compressed
    with pytest.raises(ValueError, match=r"unknown model_args \['dtype'\]; valid: pretrained, apply_pruning"):
        McMoeLMMS(pretrained=str(ckpt), dtype="bfloat16")
    tiny_mixtral().save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match="serves vision-language models.*mixtral.*lm-eval.*deepseek_vl_v2"):
        McMoeLMMS(pretrained=str(tmp_path / "text"))
    with pytest.raises(FileNotFoundError, match="neither quant_manifest.json .* nor config.json"):
        McMoeLMMS(pretrained=str(tmp_path / "missing"))
