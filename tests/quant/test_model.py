import json
import math
import os
import struct

import pytest
import torch
from tiny import batches, tiny_mixtral_q

from mcmoe_vl.moe.storage import ExpertWeights
from mcmoe_vl.quant.accounting import nominal_bits, resident_bytes
from mcmoe_vl.quant.checkpoint import (MANIFEST_FILE, TENSOR_FILE, CheckpointError, load_quantized, save_quantized,
                                      seal_manifest)
from mcmoe_vl.quant.gptq import HessianAccumulator
from mcmoe_vl.quant.model import HessianDtype, QuantizeConfig, quantize_expert, quantize_model
from mcmoe_vl.quant.plan import BitPlan, PlanError, load_plan
from mcmoe_vl.quant.qlinear import QuantExpert, QuantExperts, QuantLinear, Runtime
from model_adapters import get_adapter

PLAN = {0: [2, 3, 1, 4], 1: [2, 2, 16, 3]}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    torch.set_num_threads(1)
    orig = tiny_mixtral_q(dtype=torch.bfloat16)
    model = tiny_mixtral_q(dtype=torch.bfloat16)
    plan = BitPlan.from_experts(PLAN)
    cfg = QuantizeConfig(min_tokens=14, progress=False, act_order=True)
    report = quantize_model(model, plan, batches(), cfg, adapter=get_adapter(model))
    out = tmp_path_factory.mktemp("ckpt")
    acc = save_quantized(model, out, plan=plan, report=report, config=cfg, adapter=get_adapter(model))
    return orig, model, plan, report, out, acc


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_model_quantized_to_the_plan(quantized):
    orig, model, plan, report, _, _ = quantized
    ids = batches(1, seed=5)[0]["input_ids"]
    ref, out = _logits(orig, ids).float(), _logits(model, ids).float()
    rel = ((out - ref) ** 2).mean() / (ref**2).mean()
    # changed, not destroyed (48 calibration tokens for 128 features: quality is checked per layer elsewhere)
    assert 0 < rel < 1.0
    for la in report.layers:
        assert [e.bits for e in la.experts] == PLAN[la.index]
        assert sum(e.tokens for e in la.experts) == 2 * 2 * 24  # top-2 over 2 batches of 24 tokens
        for e in la.experts:
            want = "dense" if e.bits == 16 else ("rtn" if e.tokens < 14 else "gptq")
            assert e.method == want
    assert report.starved and all(report.starved.values())  # the setup does exercise the fallback
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts)
    assert [m.down.meta.bits for m in experts.experts] == PLAN[0]
    assert not isinstance(model.model.layers[1].mlp.experts.experts[2], QuantExpert)  # 16 bits: dense
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(model.model.layers[1].self_attn, n)
        assert isinstance(lin, QuantLinear) and lin.meta.bits == 4
        assert report.modules[f"model.layers.1.self_attn.{n}"] == 4
    # router quantized at 4 bits in place; embeddings, norms, lm_head untouched
    assert report.routers["model.layers.0.mlp.gate"] == 4
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, orig.model.layers[0].mlp.gate.weight)
    assert torch.equal(model.model.embed_tokens.weight, orig.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, orig.lm_head.weight)
    assert torch.equal(model.model.norm.weight, orig.model.norm.weight)


def test_fused_expert_equals_separate_matrix(quantized):
    """The pipeline's expert equals quantizing the same expert's 2-D weights on their own."""
    orig, model, *_ = quantized
    layer = get_adapter(orig).moe_layers(orig)[0]
    captured = []
    h = layer.block.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    for b in batches():
        _logits(orig, b["input_ids"])
    h.remove()
    cfg = QuantizeConfig(act_order=True, progress=False)
    checked = 0
    for e, bits in enumerate(PLAN[0]):
        w = layer.expert_weights(e)
        acc_in, acc_down = HessianAccumulator(128), HessianAccumulator(256)
        for x in captured:
            tok = (layer.route(x).topk_idx == e).any(-1)
            xe = x[tok]
            acc_in.add(xe)
            acc_down.add(torch.nn.functional.silu(xe @ w.gate.t()) * (xe @ w.up.t()))
        if acc_in.n < 14:
            continue
        sep = ExpertWeights(gate=w.gate.detach().clone(), up=w.up.detach().clone(), down=w.down.detach().clone())
        res = quantize_expert(sep, bits, cfg, group_size=128, h_in=acc_in.hessian(), h_down=acc_down.hessian())
        q = model.model.layers[0].mlp.experts.experts[e]
        gate_up = q.gate_up.packed.dequantize(torch.float32)
        assert torch.equal(gate_up, torch.cat([res["gate"].weight, res["up"].weight]))
        assert torch.equal(q.down.packed.dequantize(torch.float32), res["down"].weight)
        checked += 1
    assert checked >= 2


def test_saved_then_loaded_is_bit_identical(quantized):
    _, model, _, _, out, acc = quantized
    ids = batches(1, seed=9)[0]["input_ids"]
    ref = _logits(model, ids)
    packed = load_quantized(out)
    assert torch.equal(_logits(packed, ids), ref)
    fake = load_quantized(out, runtime=Runtime.FAKE)
    assert torch.equal(_logits(fake, ids), ref)
    assert resident_bytes(packed) == acc.resident_bytes
    lut = load_quantized(out, kernel="lut")  # table-lookup products: equal up to summation order
    one = ids[:, :1]
    torch.testing.assert_close(_logits(lut, one).float(), _logits(packed, one).float(), rtol=0.05, atol=0.05)
    assert resident_bytes(fake, include_caches=True) > resident_bytes(packed)


def test_refuses_truncated_edited_or_foreign_checkpoints(quantized, tmp_path):
    import shutil

    _, _, _, _, out, _ = quantized
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = (bad / TENSOR_FILE).read_bytes()
    (bad / TENSOR_FILE).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(bad)
    edited = bytearray(data)
    edited[-5] ^= 0xFF
    (bad / TENSOR_FILE).write_bytes(bytes(edited))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_quantized(bad)
    (bad / TENSOR_FILE).write_bytes(data)
    man = json.loads((bad / MANIFEST_FILE).read_text())
    name = "model.layers.0.mlp.experts.experts.1.down.scale"
    man["tensors"][name]["shape"] = [128, 3]
    (bad / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="edited after it was written"):
        load_quantized(bad)
    (bad / MANIFEST_FILE).write_text(json.dumps(seal_manifest(man)))  # a consistent but wrong manifest
    with pytest.raises(CheckpointError, match=r"down\.scale"):
        load_quantized(bad)
    # a model of another shape (3 layers) is refused with the missing tensors named
    shutil.copy(out / MANIFEST_FILE, bad / MANIFEST_FILE)
    other = tiny_mixtral_q(layers=3, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="missing.*layers.2"):
        load_quantized(bad, model=other)


def test_two_bit_plan_costs_2_25_bits_on_disk(tmp_path):
    torch.set_num_threads(1)
    model = tiny_mixtral_q(dtype=torch.bfloat16)
    plan = BitPlan.uniform({0: 4, 1: 4}, 2)
    report = quantize_model(model, plan, batches(1), QuantizeConfig(progress=False, min_tokens=0),
                            adapter=get_adapter(model))
    acc = save_quantized(model, tmp_path, plan=plan, report=report, adapter=get_adapter(model))
    assert acc.effective_bits_experts == pytest.approx(2.25)  # 2 + (16 + 16) / 128, not 16 with a label
    assert acc.nominal_bits == pytest.approx(nominal_bits([(2 * 4 * 3 * 128 * 256, 2), (2 * 2 * 128 * (128 + 64), 4)]))
    # bytes on disk = the safetensors header + exactly the stored bytes the effective bits count
    path = tmp_path / TENSOR_FILE
    with open(path, "rb") as fh:
        header = 8 + struct.unpack("<Q", fh.read(8))[0]
    stored = sum(c.stored_bytes for c in acc.categories.values())
    assert acc.bytes_on_disk == os.stat(path).st_size == header + stored
    assert stored * 8 / acc.params == pytest.approx(acc.effective_bits)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:  # the experts' tensors as stored in the file
        expert_bytes = sum(fh.get_tensor(k).nbytes for k in fh.keys() if ".mlp.experts." in k)
    assert expert_bytes == acc.categories["experts"].stored_bytes
    assert expert_bytes * 8 / (2 * 4 * 3 * 128 * 256) == pytest.approx(2.25)
    dense = tiny_mixtral_q(dtype=torch.bfloat16)
    assert resident_bytes(model) < resident_bytes(dense)


def test_paper_nominal_bits_from_mixtral_8x7b_shapes():
    # Mixtral-8x7B config: hidden 4096, intermediate 14336, 8 experts, 32 heads x 128, 8 KV heads, 32 layers
    h, inter, e, kv, layers = 4096, 14336, 8, 8 * 128, 32
    experts = layers * e * 3 * inter * h
    attention = layers * (2 * h * h + 2 * kv * h)
    paper = {1.5: 1.57, 2.0: 2.05, 2.5: 2.54}
    for avg, printed in paper.items():
        nb = nominal_bits([(experts, avg), (attention, 4)])
        assert math.floor(nb * 100) / 100 == printed  # the paper truncates to two decimals
        assert nb - printed < 0.01


def test_plan_files_and_errors(tmp_path):
    plan = BitPlan.from_experts(PLAN, modules={"re:.*\\.o_proj": 16}, allocator="hand")
    plan.save(tmp_path / "p.json")
    back = load_plan(tmp_path / "p.json")
    assert back == plan
    assert back.module_bits("model.layers.0.self_attn.o_proj") == 16
    assert back.module_bits("model.layers.0.self_attn.q_proj") == 4
    assert back.module_bits("lm_head") == 16 and back.module_bits("model.vision_tower.blocks.0.fc1") == 16
    with pytest.raises(PlanError, match="3 widths but the model has 4"):
        BitPlan.from_experts({0: [2, 2, 2]}).expert_bits(0, 4)
    with pytest.raises(ValueError, match="valid widths"):
        BitPlan.from_experts({0: [5]})
    (tmp_path / "x.json").write_text("{\"experts\": {}}")
    with pytest.raises(PlanError, match="layers: required key is missing; experts: unknown key"):
        load_plan(tmp_path / "x.json")
    model = tiny_mixtral_q()
    with pytest.raises(PlanError, match="layers \\[5\\]"):
        quantize_model(model, BitPlan.from_experts({0: [2] * 4, 1: [2] * 4, 5: [2]}), batches(1),
                       QuantizeConfig(progress=False), adapter=get_adapter(model))


def test_allocator_bit_plan_file_round_trips(tmp_path):
    from mcmoe_vl.quant.plan import LayerPlan

    bp = BitPlan(model_type="mixtral", allocator="pmq", layers=[LayerPlan(index=0, path="model.layers.0.mlp",
                                                                          bits=[1, 2, 3, 4])], other_bits=3)
    bp.save(tmp_path / "plan.json")
    plan = load_plan(tmp_path / "plan.json")
    assert plan == bp and plan.experts == {0: [1, 2, 3, 4]}
    assert plan.module_bits("model.layers.0.self_attn.q_proj") == 3


def test_hessian_dtype_option():
    assert HessianDtype("float64").torch is torch.float64


def test_quantized_experts_through_the_interface_storage(quantized):
    from mcmoe_vl.quant.qlinear import QuantExpertStorage

    _, model, *_ = quantized
    st = QuantExpertStorage(model.model.layers[1].mlp.experts)
    assert st.num_experts == 4
    x = torch.randn(5, 128).bfloat16()
    for i in range(4):
        w = st.weights(i)
        assert w.gate.shape == (256, 128) and w.down.shape == (128, 256)
        ref = torch.nn.functional.linear(torch.nn.functional.silu(x @ w.gate.t()) * (x @ w.up.t()), w.down)
        torch.testing.assert_close(st.dense_expert(i)(x).float(), ref.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", ["tiny_deepseek_v2", "tiny_deepseek_v3", "tiny_qwen3_moe"])
def test_other_families_quantize_save_and_load(family, tmp_path):
    import tiny_models

    torch.set_num_threads(1)
    model = getattr(tiny_models, family)()
    layers = {la.index: la.num_experts for la in get_adapter(model).moe_layers(model)}
    plan = BitPlan.uniform(layers, 2, group_size=16)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    report = quantize_model(model, plan, [{"input_ids": ids}], QuantizeConfig(progress=False, min_tokens=2),
                            adapter=get_adapter(model))
    assert len(report.layers) == len(layers) and report.routers
    assert all(b == 4 for b in report.modules.values())  # attention, dense MLPs, shared experts: default 4 bits
    save_quantized(model, tmp_path, plan=plan, report=report, adapter=get_adapter(model))
    ref = _logits(model, ids)
    assert torch.isfinite(ref).all()
    assert torch.equal(_logits(load_quantized(tmp_path), ids), ref)


def test_expert_interface_sees_a_quantized_model_directly(quantized):
    """The adapter describes QuantExperts through their own storage: the interface runs the packed experts."""
    from model_adapters import expert_interface

    _, model, _, _, _, _ = quantized
    ids = batches(1, seed=7)[0]["input_ids"]
    ref = _logits(model, ids)
    rows = []
    with torch.no_grad(), expert_interface(model) as iface:
        layer = iface.layers[0]
        assert layer.expert(0) is model.model.layers[0].mlp.experts.experts[0]  # the packed module itself
        w = layer.expert_weights(0)
        assert w.gate.shape[1] == model.config.hidden_size
        iface.observe(lambda ev: rows.append(ev.routing.topk_idx.numel()))
        out = model(ids).logits
    assert rows and ref.float().abs().mean() > 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
