"""Pruning on the embedded trained Mixtral (embedded/mixtral-tiny): OTP training with fixed seeds.

Skipped when the embedded model is not in the checkout. Data: docstrings of two standard-library modules (parsed
directly, no corpus build), byte tokens as the model was trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mcmoe_vl.pruning.otp import MaskPredictor, OTPConfig, fit_mask_predictor, layer_data
from model_adapters import expert_interface

MODEL_DIR = Path(__file__).resolve().parents[1] / "embedded" / "mixtral-tiny"

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="embedded model not present")



def _docstring_ids(names=("json/decoder.py", "textwrap.py"), seq_len=128, num=12):
    from mcmoe_vl.data.text import parse_module, stdlib_dir
    from mcmoe_vl.data.tokenizer import encode_bytes

    text = ""
    for name in names:
        doc = parse_module((stdlib_dir() / name).read_text(encoding="utf-8"), name)
        text += (doc.docstrings if doc else "") + "\n\n"
    ids = torch.tensor(encode_bytes(text), dtype=torch.int64)
    assert ids.numel() >= seq_len * num, "not enough docstring text for the test windows"
    return ids[: seq_len * num].reshape(num, seq_len)


@pytest.fixture(scope="module")
def embedded_layer_data():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    model.set_experts_implementation("eager")
    ids = _docstring_ids()
    got = {}
    with torch.no_grad(), expert_interface(model) as iface:
        iface.observe(lambda ev: got.setdefault(ev.layer.index, (ev.hidden.clone(), ev.routing)))
        model(ids)
        la = iface.layers[len(iface.layers) // 2]
        x, r = got[la.index]
        return la.top_k, layer_data(la, x, r.topk_idx, r.topk_weight)


def test_otp_on_the_embedded_model_reaches_its_target_with_bounded_distillation(embedded_layer_data):
    k, data = embedded_layer_data
    target = 0.25  # half of the second experts
    # From keeping every pair (no ratio-rule start, no offset calibration): the penalty alone moves it.
    cfg = OTPConfig(prune_rate=target, steps=200, lr=0.02, init_at_target=False, calibrate_offset=False, seed=0)
    start = MaskPredictor(data.x.shape[1], k, cfg.width, cfg.init_logit).ranked_logits(data.x, data.w)
    assert start.gt(0).float().mean() > 0.95  # starts (nearly) unpruned
    _, summary = fit_mask_predictor(data, k, cfg)
    assert abs(summary["pruned_fraction"] - target) < 0.08
    N = data.num_tokens
    drop = torch.ones(N * (k - 1))
    n_drop = round(summary["pruned_fraction"] * k * N)
    drop[torch.randperm(N * (k - 1), generator=torch.Generator().manual_seed(1))[:n_drop]] = 0.0
    random_loss = float(data.distill(torch.arange(N), torch.cat([torch.ones(N, 1), drop.reshape(N, k - 1)], 1)))
    assert 0.0 < summary["distill_hard"] < random_loss
