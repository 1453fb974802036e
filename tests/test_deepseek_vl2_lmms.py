"""The DeepSeek-VL2 lmms-eval model: its methods against the model itself, and a run of lmms-eval's evaluator on
two local tasks (multiple choice by log-likelihood, and generation) with an in-memory instance."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by scripts/setup.sh")

from lmms_eval.api.instance import Instance  # noqa: E402

from model_adapters.deepseek_vl2 import model_from_config  # noqa: E402
from model_adapters.deepseek_vl2.generation import greedy_generate  # noqa: E402
from model_adapters.deepseek_vl2.lmms_model import DeepseekVL2LMMS  # noqa: E402
from model_adapters.deepseek_vl2.processing import DeepseekVL2Processor  # noqa: E402
from model_adapters.deepseek_vl2.tiny import tiny_official_config, tiny_tokenizer  # noqa: E402



COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _image(color: str) -> Image.Image:
    rng = np.random.default_rng(len(color))
    base = np.array(COLORS[color], dtype=np.int16)
    px = np.clip(base + rng.integers(-20, 20, (50, 70, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(px)


@pytest.fixture(scope="module")
def lm():
    model = model_from_config(tiny_official_config(), seed=0)
    with torch.no_grad():
        for p in model.language.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)  # sharper predictions than the default init
    return DeepseekVL2LMMS(model, DeepseekVL2Processor.from_config(tiny_tokenizer(), model), batch_size=2,
                           max_new_tokens=5)


DOCS = [
    {"question": "What color is the image?", "color": "red", "choices": ["red", "green", "blue"], "answer": 0},
    {"question": "Which color fills the picture?", "color": "green", "choices": ["red", "green", "blue"],
     "answer": 1},
    {"question": "Name the color.", "color": "blue", "choices": ["red", "green", "blue"], "answer": 2},
]


def _req(kind, args):
    return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": args[3], "repeats": 1})


def _task_dict(lm):
    lm.task_dict = {"t": {"test": DOCS}}


def _visual(doc):
    return [_image(doc["color"])]


def test_loglikelihood_is_the_sum_of_continuation_log_probs(lm):
    _task_dict(lm)
    reqs = [_req("loglikelihood", (d["question"], " " + c, _visual, i, "t", "test"))
            for i, d in enumerate(DOCS) for c in d["choices"]]
    nll = [r.text for r in lm.loglikelihood(reqs)]  # (negative log-likelihood, is_greedy): lmms-eval's loss convention
    assert len(nll) == 9 and all(isinstance(s, float) and s > 0 for s, _ in nll)
    out = [(-s, g) for s, g in nll]
    # Independent recomputation for one request: full forward, log-softmax, gather.
    proc, tok, model = lm.processor, lm.tokenizer, lm.model
    prompt = proc.format_conversation([{"role": "user", "content": "<image>\n" + DOCS[1]["question"]}])
    assert prompt.endswith("<|Assistant|>:")
    sample = proc.process_one(prompt=prompt, images=_visual(DOCS[1]))
    cont = tok.encode(" blue", add_special_tokens=False)
    ids = torch.cat([sample.input_ids, torch.tensor(cont)])[None]
    mask = torch.cat([sample.images_seq_mask, torch.zeros(len(cont), dtype=torch.bool)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, images=sample.images[None], images_seq_mask=mask,
                       images_spatial_crop=sample.images_spatial_crop[None]).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    n = sample.input_ids.numel()
    expect = sum(float(lp[n - 1 + j, t]) for j, t in enumerate(cont))
    assert out[5][0] == pytest.approx(expect, abs=1e-4)
    # The greedy flag: a one-token continuation is greedy exactly when it is the argmax.
    order = [int(t) for t in logits[n - 1].argsort(descending=True)]
    text_tokens = [t for t in order if t >= 6 and tok.encode(tok.decode([t]), add_special_tokens=False) == [t]]
    first, other = text_tokens[0], text_tokens[1]
    s, greedy = lm.score(prompt, tok.decode([first]), _visual(DOCS[1]))
    assert greedy == (first == order[0]) and s == pytest.approx(float(lp[n - 1, first]), abs=1e-4)
    s2, greedy2 = lm.score(prompt, tok.decode([other]), _visual(DOCS[1]))
    assert not greedy2 and s2 < s
    # The images matter.
    assert out[0][0] != pytest.approx(lm.score(prompt.replace("<image>\n", ""), " red")[0], abs=1e-3)


def test_shared_prompt_scoring_equals_one_forward_per_choice(lm):
    """score_choices (prompt once, continuations batched from its cache) equals score (a full forward per choice),
    with continuations of one and of several tokens mixed in one batch."""
    prompt = lm._prompt(DOCS[0]["question"], 1)
    conts = [" red", " green and blue", " b", " the colour is blue", "red"]
    lengths = {len(lm.tokenizer.encode(c, add_special_tokens=False)) for c in conts}
    assert 1 in lengths and max(lengths) >= 4, lengths  # the batch really mixes lengths
    shared = lm.score_choices(prompt, conts, _visual(DOCS[0]))
    for c, (s, g) in zip(conts, shared, strict=True):
        ref, ref_greedy = lm.score(prompt, c, _visual(DOCS[0]))
        assert s == pytest.approx(ref, abs=1e-4) and g == ref_greedy, c
    with pytest.raises(ValueError, match="no tokens"):
        lm.score_choices(prompt, [" red", ""], _visual(DOCS[0]))


def test_generate_until_equals_greedy_generation_and_cuts_at_until(lm):
    _task_dict(lm)
    reqs = [_req("generate_until", (d["question"], {"max_new_tokens": 5, "until": ["\n\n"]}, _visual, i, "t", "test"))
            for i, d in enumerate(DOCS)]
    texts = lm.generate_until(reqs)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    for d, text in zip(DOCS, texts, strict=True):
        prompt = lm.processor.format_conversation([{"role": "user", "content": "<image>\n" + d["question"]}])
        batch = lm.processor(prompts=[prompt], images=[_visual(d)])
        toks = greedy_generate(lm.model, batch, max_new_tokens=5, eos_token_id=lm.tokenizer.eos_token_id)
        expect = lm.tokenizer.decode(toks[0], skip_special_tokens=True).split("\n\n")[0].strip()
        assert text == expect
    # A stop string cuts the text.
    first = texts[0]
    if len(first) > 1:
        cut = lm.generate_until([_req("generate_until", (DOCS[0]["question"],
                                                         {"max_new_tokens": 5, "until": [first[1:]]}, _visual, 0,
                                                         "t", "test"))])
        assert cut == [first[:1].strip()]


def _write_tasks(root):
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    (root / "vl2_utils.py").write_text(textwrap.dedent(f"""
        import numpy as np
        from PIL import Image
        COLORS = {COLORS!r}
        def doc_to_visual(doc):
            rng = np.random.default_rng(len(doc["color"]))
            base = np.array(COLORS[doc["color"]], dtype=np.int16)
            px = np.clip(base + rng.integers(-20, 20, (50, 70, 3)), 0, 255).astype(np.uint8)
            return [Image.fromarray(px)]
        def doc_to_choice(doc):
            return doc["choices"]
        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]
    """))
    common = textwrap.dedent(f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {root / "hf_cache"}
        test_split: test
        doc_to_visual: !function vl2_utils.doc_to_visual
        doc_to_text: !function vl2_utils.doc_to_text
    """)
    (root / "vl2_mc.yaml").write_text(common + textwrap.dedent("""
        task: vl2_local_mc
        output_type: multiple_choice
        doc_to_choice: !function vl2_utils.doc_to_choice
        doc_to_target: answer
        metric_list:
          - metric: acc
    """))
    (root / "vl2_gen.yaml").write_text(common + textwrap.dedent("""
        task: vl2_local_gen
        output_type: generate_until
        doc_to_target: color
        generation_kwargs:
          max_new_tokens: 4
          until: ["\\n\\n"]
        metric_list:
          - metric: exact_match
    """))


def test_evaluator_runs_with_an_in_memory_instance(lm, tmp_path, monkeypatch):
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    _write_tasks(tmp_path)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = evaluator.simple_evaluate(model=lm, tasks=["vl2_local_mc", "vl2_local_gen"], task_manager=tm,
                                    batch_size=2, log_samples=True, bootstrap_iters=0)
    assert res is not None
    acc = res["results"]["vl2_local_mc"]["acc,none"]
    em = res["results"]["vl2_local_gen"]["exact_match,none"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= em <= 1.0
    # The accuracy is what the model's own scores give.
    _task_dict(lm)
    correct = 0
    for i, d in enumerate(DOCS):
        reqs = [_req("loglikelihood", (d["question"], " " + c, _visual, i, "t", "test")) for c in d["choices"]]
        losses = [r.text[0] for r in lm.loglikelihood(reqs)]
        correct += int(np.argmin(losses) == d["answer"])  # the least negative log-likelihood wins
    assert acc == pytest.approx(correct / 3)
    assert len(res["samples"]["vl2_local_mc"]) == 3


def test_from_pretrained_directory(lm, tmp_path):
    from model_adapters.deepseek_vl2 import save_official

    save_official(lm.model, tmp_path)
    lm.tokenizer.save_pretrained(str(tmp_path))
    again = DeepseekVL2LMMS.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu")
    prompt = lm.processor.format_conversation([{"role": "user", "content": "<image>\nWhat?"}])
    images = [_image("red")]
    assert again.score(prompt, " red", images) == pytest.approx(lm.score(prompt, " red", images), abs=1e-5)
