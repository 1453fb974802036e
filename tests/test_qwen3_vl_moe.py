"""Qwen3-VL-MoE through the library with nothing but its adapter: image+text calibration batches from the adapter,
calibration statistics split by image and text tokens, PMQ allocation, GPTQ, save / load, ODP and OTP.

A tiny random Qwen3VLMoeForConditionalGeneration (tests/tiny_models.py) with deepstack visual features, an offline
tokenizer and the torchvision-free PIL image processor; each image is 49 image tokens. The deepstack replay in the
layer-by-layer pass is tested in tests/test_qwen3_vl_moe_deepstack.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_qwen3_vl_moe, tiny_qwen3_vl_tokenizer

from mcmoe_vl.allocation.allocate import allocate
from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.calibration.calibrate import CalibrationConfig, calibrate
from mcmoe_vl.calibration.image_text import ImageTextSample
from mcmoe_vl.pruning.odp import ODPConfig, fit_odp
from mcmoe_vl.pruning.otp import OTPConfig, train_otp
from mcmoe_vl.quant.checkpoint import load_quantized, save_quantized
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.qlinear import Runtime
from model_adapters import expert_interface, get_adapter


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_qwen3_vl_moe(), tiny_qwen3_vl_tokenizer()
    adapter = get_adapter(model)
    rng = np.random.default_rng(0)
    questions = ["What colour is the big square in the middle of the picture?", "Count the dots.",
                 "Which shape is shown here, a circle, a square or a star?", "Left?"]  # lengths differ: padding
    samples = [ImageTextSample(q, [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))],
                               answer="red" if i % 2 else None) for i, q in enumerate(questions)]
    batches = adapter.calibration_batches(adapter.load_processor(tok, model), samples, batch_size=2)
    return model, adapter, batches


def test_calibration_batches_mark_image_tokens_and_padding(setup):
    model, _, batches = setup
    for b in batches:
        assert b["image_token_mask"].sum() == 49 * 2  # one image per sample
        assert (b["attention_mask"] == 0).any()  # left padding: the samples differ in length
        assert not (b["image_token_mask"] & (b["attention_mask"] == 0)).any()
    with torch.no_grad():
        out = model(**{k: v for k, v in batches[0].items() if k != "image_token_mask"})
    assert out.logits.abs().mean() > 0.01


def test_calibration_splits_statistics_by_image_and_text_tokens(setup):
    model, _, batches = setup
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    image = sum(int(b["image_token_mask"].sum()) for b in batches)
    stats = calibrate(model, batches, CalibrationConfig(eps_bits=(1, 2, 3), group_size=8, min_tokens=0),
                      progress=False)
    assert [la.index for la in stats.layers] == [0, 1]
    for la in stats.layers:
        assert la.all.num_tokens == real and la.image.num_tokens == image and la.text.num_tokens == real - image
        assert sum(la.image.counts) == 2 * image and min(la.all.counts) > 0  # every expert received tokens


def test_pmq_gptq_save_load_odp_otp(setup, tmp_path):
    model, adapter, batches = setup
    stats = calibrate(model, batches, CalibrationConfig(eps_bits=(1, 2, 3), group_size=8, min_tokens=0),
                      progress=False)
    plan = allocate(stats, AllocationConfig(method="pmq", target_bits=2.0, group_size=8))
    assert sorted({b for la in plan.layers for b in la.bits}) != [2]  # PMQ mixes widths
    quantized = tiny_qwen3_vl_moe()
    cfg = QuantizeConfig(progress=False, min_tokens=0, runtime=Runtime.FAKE)
    report = quantize_model(quantized, plan, batches, cfg, adapter=adapter)
    save_quantized(quantized, tmp_path / "q", plan=plan, report=report, config=cfg, adapter=adapter)
    loaded = load_quantized(tmp_path / "q", model=tiny_qwen3_vl_moe(seed=5), runtime=Runtime.FAKE)
    x = {k: v for k, v in batches[0].items() if k != "image_token_mask"}
    with torch.no_grad():
        ref, q, back = model(**x).logits, quantized(**x).logits, loaded(**x).logits
    torch.testing.assert_close(back, q, rtol=0, atol=0)  # the checkpoint round-trips
    assert (q - ref).abs().mean() > 1e-4  # and is quantized
    odp = fit_odp(loaded, batches, ODPConfig(prune_rate=0.2), iface=expert_interface(loaded))
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert odp.calibration_tokens == real and all(0.1 < f < 0.3 for f in odp.calibration_pruned_fraction.values())
    _, summary = train_otp(loaded, batches, OTPConfig(prune_rate=0.2, steps=3), iface=expert_interface(loaded),
                           progress=False)
    assert all(s["tokens"] == real for s in summary.values())


def test_lmms_eval_runs_the_offline_image_tasks(setup):
    """The suite's lmms-eval backend serves the model through its adapter: a generation task and a
    multiple-choice task of the offline image suite produce their metrics."""
    pytest.importorskip("lmms_eval")
    from pathlib import Path

    from mcmoe_vl.evaluation.lm_eval_backend import TaskRequest
    from mcmoe_vl.evaluation.lmms_eval_backend import evaluate_lmms_eval

    model, adapter, _ = setup
    processor = adapter.load_processor(tiny_qwen3_vl_tokenizer(), model)
    tasks = Path(__file__).resolve().parents[1] / "tasks" / "lmms_eval"
    out = evaluate_lmms_eval(model, processor, [TaskRequest("mcmoe_vqa_colour", None, 2, None),
                                                TaskRequest("mcmoe_vqa_digit_mc", None, 2, None)],
                             adapter=adapter, include_paths=[tasks], batch_size=1, max_new_tokens=4)
    assert set(out["results"]) >= {"mcmoe_vqa_colour", "mcmoe_vqa_digit_mc"}
    for name in ("mcmoe_vqa_colour", "mcmoe_vqa_digit_mc"):
        metrics = {k: v for k, v in out["results"][name].items() if "," in k and "stderr" not in k}
        assert metrics and all(isinstance(v, (int, float)) for v in metrics.values()), out["results"][name]

