"""The fused MoE path (one native call per layer) equals the interface's dispatch on the same packed experts."""

import copy

import pytest
import torch
from native_lib import isas
from tiny import batches, tiny_mixtral_q
from torch import nn

from mcmoe_vl.moe import RoutingDecision
from mcmoe_vl.moe.fused import FusedMoE, install_fused
from mcmoe_vl.quant.gptq import rtn_quantize
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.plan import BitPlan
from mcmoe_vl.quant.qlinear import Kernel, QuantExpert, QuantLinear, concat_rows, set_kernel
from mcmoe_vl.quant.quantizer import get_quantizer
from model_adapters import expert_interface, get_adapter

H, I = 256, 384


def _lin(bits, r, c, seed, perm=False):
    g = torch.Generator().manual_seed(seed)
    p = PackedTensor.from_result(rtn_quantize(torch.randn(r, c, generator=g) * 0.1, get_quantizer(bits)))
    if perm:
        p = PackedTensor(p.qdata, p.scale, p.zero, torch.randperm(c, generator=g).to(torch.int32), p.meta)
    return p


class _MLP(nn.Module):  # a shared expert as the models write it
    def __init__(self, bits, seed):
        super().__init__()
        self.gate_proj = QuantLinear(_lin(bits, I, H, seed), dtype=torch.float32)
        self.up_proj = QuantLinear(_lin(bits, I, H, seed + 1, perm=True), dtype=torch.float32)
        self.down_proj = QuantLinear(_lin(bits, H, I, seed + 2), dtype=torch.float32)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _expert(bits, seed):
    gu = concat_rows(_lin(bits, I, H, seed), _lin(bits, I, H, seed + 1))
    return QuantExpert(QuantLinear(_lin(bits, H, I, seed + 2, perm=bits == 3), dtype=torch.float32),
                       nn.functional.silu, gate_up=QuantLinear(gu, dtype=torch.float32))


def test_fused_layer_equals_the_expert_loop(native_lib):
    widths = [1, 2, 3, 4, 2, 3]  # per-expert widths
    experts = [_expert(b, 10 * i) for i, b in enumerate(widths)]
    shared = [_MLP(4, 100), _MLP(2, 200)]
    fused = FusedMoE.build(experts, shared, max_tokens=32)
    assert fused is not None and fused.num_shared == 2
    g = torch.Generator().manual_seed(0)
    for T in (1, 5, 32):
        x = torch.randn(T, H, generator=g)
        idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(T)])  # (T, 3) distinct experts
        w = torch.rand(T, 3, generator=g)
        keep = torch.rand(T, 3, generator=g) > 0.3
        keep[:, 0] = True
        ref = torch.zeros(T, H, dtype=torch.float64)
        for t in range(T):
            for j in range(3):
                if keep[t, j]:
                    ref[t] += w[t, j].double() * experts[idx[t, j]](x[t : t + 1])[0].double()
            ref[t] += sum(s(x[t : t + 1])[0].double() for s in shared)
        assert ref.abs().max() > 0.1
        for isa in isas(native_lib):
            out = fused(x, idx, w, keep, isa=isa)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            assert fused.last_pairs == int(keep.sum()) + 2 * T  # pruned pairs are never computed
    assert fused(torch.randn(33, H), idx[:1].expand(33, 3), w[:1].expand(33, 3)) is None  # prefill: declined
    routed = FusedMoE.build(experts, max_tokens=2)  # no shared experts: declines only when an expert gets > 2
    spread = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 2]])
    assert routed(torch.randn(4, H), spread, torch.ones(4, 2)) is not None
    assert routed(torch.randn(4, H), spread.fill_(1), torch.ones(4, 2)) is None
    assert copy.deepcopy(fused) is None  # copies rebuild their pointers


def _tiny(family):
    import tiny_models

    if family == "mixtral":
        return tiny_mixtral_q(experts=4), 32  # experts of 128 x 256: the SIMD blocks run
    return getattr(tiny_models, f"tiny_{family}")(), 16


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "deepseek_v3", "deepseek_vl2"])
def test_fused_model_equals_dispatch_with_pruning(native_lib, family):
    torch.set_num_threads(1)
    model, gs = _tiny(family)
    layers = {la.index: la.num_experts for la in get_adapter(model).moe_layers(model)}
    plan = BitPlan.from_experts({i: [(1, 2, 3, 4)[e % 4] for e in range(n)] for i, n in layers.items()}, group_size=gs)
    quantize_model(model, plan, batches(1, seq=8), QuantizeConfig(progress=False, min_tokens=10**9),
                   adapter=get_adapter(model))  # RTN: fast
    ids = batches(1, seq=12, seed=3)[0]["input_ids"]
    calls = []

    def prune(layer, hidden, shape, routing):  # drop the second slot of every other token (top-1 stays)
        keep = torch.ones_like(routing.topk_idx, dtype=torch.bool)
        top1 = routing.top1_slot()
        other = (top1 + 1) % keep.shape[1]
        keep[::2].scatter_(1, other[::2, None], False)
        return RoutingDecision.keep_only(routing, keep, layer.spec)

    with torch.no_grad(), expert_interface(model) as iface:
        iface.set_routing_override(prune)
        ref_prefill = model(ids).logits
        ref_step = model(ids[:, :3]).logits  # a few tokens: the decode-sized step
        assert install_fused(iface, max_tokens=64) == len(iface.layers)
        for layer in iface.layers:
            f = layer.fused
            layer.fused = lambda *a, f=f: calls.append(1) or f(*a)
        out_prefill = model(ids).logits
        out_step = model(ids[:, :3]).logits
    assert len(calls) == 2 * len(layers)  # every layer ran fused, for both calls
    assert ref_prefill.abs().mean() > 0
    torch.testing.assert_close(out_prefill, ref_prefill, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_step, ref_step, rtol=1e-4, atol=1e-4)


def test_quant_experts_module_runs_fused_with_the_simd_kernel(native_lib):
    torch.set_num_threads(1)
    model = tiny_mixtral_q(experts=4)
    quantize_model(model, BitPlan.from_experts({0: [2, 3, 1, 4], 1: [2, 2, 3, 3]}, group_size=32), batches(1, seq=8),
                   QuantizeConfig(progress=False, min_tokens=10**9), adapter=get_adapter(model))
    ids = batches(1, seq=6, seed=5)[0]["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
        set_kernel(model, Kernel.SIMD)
        out = model(ids).logits
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.fused(), FusedMoE)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_fused_layer_with_bf16_tokens(native_lib):
    """bf16 hidden states (AVX512-BF16 where available): equals the expert loop of bf16 modules to bf16 round-off."""
    widths = [1, 2, 3, 4]
    experts = [_expert(b, 10 * i) for i, b in enumerate(widths)]
    shared = [_MLP(4, 100)]
    for m in [*experts, *shared]:
        for lin in m.modules():
            if isinstance(lin, QuantLinear):
                lin.dtype = torch.bfloat16
    fused = FusedMoE.build(experts, shared, max_tokens=8)
    g = torch.Generator().manual_seed(1)
    T = 4
    x = torch.randn(T, H, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=g).bfloat16()
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(2):
            ref[t] += w[t, j].double() * experts[idx[t, j]](x[t : t + 1])[0].double()  # bf16 modules, SIMD
        ref[t] += shared[0](x[t : t + 1])[0].double()
    out = fused(x, idx, w)
    assert out.dtype == torch.bfloat16 and ref.abs().max() > 0.1
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
