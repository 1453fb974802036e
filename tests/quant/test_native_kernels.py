import logging

import pytest
import torch

from mcmoe_vl.quant import kernels, native
from mcmoe_vl.quant.gptq import rtn_quantize
from mcmoe_vl.quant.kernel_registry import PackedKernel, find_packed_matmul, register_packed_matmul
from mcmoe_vl.quant.native import Isa
from mcmoe_vl.quant.packed import PackedTensor
from mcmoe_vl.quant.qlinear import Kernel, QuantLinear
from mcmoe_vl.quant.quantizer import get_quantizer

from native_lib import isas

# (rows, cols, group): a partial last group with a tail shorter than any SIMD block, group 64, a group of 32
# (narrower than the AVX-512 blocks at 1 and 3 bits, so those run the next path), and group 8 (scalar only)
SHAPES = [(33, 328, 128), (16, 256, 64), (21, 96, 32), (5, 40, 8)]


def _packed(bits, r, c, gs, perm=False, seed=0):
    g = torch.Generator().manual_seed(seed * 100 + bits)
    w = torch.randn(r, c, generator=g)
    p = PackedTensor.from_result(rtn_quantize(w, get_quantizer(bits), group_size=gs))
    if perm:
        p = PackedTensor(p.qdata, p.scale, p.zero, torch.randperm(c, generator=g).to(torch.int32), p.meta)
    return p


def _check_close(y, x, p):
    w = p.dequantize(torch.float64)  # natural column order
    ref = x.double() @ w.t()
    bound = x.double().abs() @ w.abs().t()  # float32 round-off scales with sum |x w|
    assert ref.abs().max() > 1 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= 2e-6 * bound + 1e-30).all(), (y.double() - ref).abs().max()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("perm", [False, True], ids=["natural", "act-order"])
def test_every_path_matches_the_float64_product(native_lib, bits, shape, perm):
    r, c, gs = shape
    p = _packed(bits, r, c, gs, perm)
    for isa in isas(native_lib):
        block = native_lib.mq_block(int(isa), bits)
        for t in (1, 2, 3, 8, 17, 32):
            x = torch.randn(t, c)
            y, used = kernels.packed_matmul(x, p, isa=isa, return_isa=True)
            _check_close(y, x, p)
            # the forced path really ran, unless its block does not divide the group (then the next narrower)
            assert used == isa if isa == Isa.SCALAR or gs % block == 0 else used < isa


def test_no_tokens(native_lib):
    p = _packed(2, 8, 256, 128)
    assert kernels.packed_matmul(torch.randn(0, 256), p).shape == (0, 8)
    assert QuantLinear(p, dtype=torch.float32, kernel=Kernel.SIMD)(torch.randn(2, 0, 256)).shape == (2, 0, 8)


def test_threads_do_not_change_the_result(native_lib):
    p = _packed(2, 300, 512, 128)
    x = torch.randn(5, 512)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = kernels.packed_matmul(x, p)
        torch.set_num_threads(2)
        y2 = kernels.packed_matmul(x, p)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)  # rows are split between threads; each row's arithmetic is the same


def test_env_var_forces_a_path(native_lib, monkeypatch):
    p = _packed(2, 8, 256, 128)
    monkeypatch.setenv("MCMOE_VL_ISA", "scalar")
    assert kernels.packed_matmul(torch.randn(1, 256), p, return_isa=True)[1] == Isa.SCALAR
    monkeypatch.setenv("MCMOE_VL_ISA", "avx9")
    with pytest.raises(ValueError, match="valid values are"):
        kernels.packed_matmul(torch.randn(1, 256), p)


def test_bad_input_is_refused(native_lib):
    p = _packed(3, 8, 256, 128)
    with pytest.raises(ValueError, match="256 columns"):
        kernels.packed_matmul(torch.randn(2, 255), p)
    with pytest.raises(ValueError, match="unknown SIMD path"):
        kernels.packed_matmul(torch.randn(2, 256), p, isa="sse9")
    if native_lib.mq_cpu_isa() < Isa.AVX512:
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            kernels.packed_matmul(torch.randn(2, 256), p, isa="avx512")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_quant_linear_simd_kernel(native_lib, bits):
    p = _packed(bits, 40, 384, 128, perm=True)
    lin = QuantLinear(p, torch.randn(40), dtype=torch.float32, kernel=Kernel.SIMD)
    exact = QuantLinear(p, lin.bias, dtype=torch.float32, kernel=Kernel.AUTO)
    x = torch.randn(2, 3, 384)  # leading dims kept
    y = lin(x)
    _check_close((y - lin.bias).reshape(6, 40), x.reshape(6, 384), p)
    big = torch.randn(kernels.DECODE_MAX_TOKENS + 7, 384)  # prefill: dequantise once + GEMM
    _check_close(lin(big) - lin.bias, big, p)
    torch.testing.assert_close(lin(big), exact(big), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_arranged_dequantisation_is_the_weight_reordered(native_lib, bits, shape):
    r, c, gs = shape
    p = _packed(bits, r, c, gs, perm=True)
    ref32 = p.dequantize(torch.float32)  # natural order
    for isa in isas(native_lib):
        for dtype in (torch.float32, torch.bfloat16):
            w, used = kernels.dequantize_arranged(p, dtype, isa=isa)
            w = w.clone()  # the default output is the reused buffer
            # the arranged token of the identity matrix is the column order: w[:, j] = W[:, order[j]]
            order = kernels.arrange(torch.arange(c, dtype=torch.float32)[None], p, used)[0].long()
            assert sorted(order.tolist()) == list(range(c))
            assert torch.equal(w, ref32[:, order].to(dtype))  # the very values (and torch's bf16 rounding)
            part, _ = kernels.dequantize_arranged(p, dtype, isa=used, rows=(r // 3, r))
            assert torch.equal(part, w[r // 3 :])


def test_prefill_in_blocks_of_rows(native_lib, monkeypatch):
    p = _packed(3, 100, 384, 128, perm=True)
    monkeypatch.setattr(kernels, "PREFILL_BLOCK", 16 * 384)  # 16 rows per block: 7 blocks, the last partial
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(40, 384).to(dtype)
        y = kernels.prefill_matmul(x, p)
        assert y.dtype == dtype and y.shape == (40, 100)
        if dtype == torch.float32:
            _check_close(y, x, p)
        else:  # bf16 GEMM: its own rounding, against the same product of the bf16 weight
            ref = x.double() @ p.dequantize(torch.bfloat16).double().t()
            torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    with pytest.raises(ValueError, match="out of range"):
        kernels.dequantize_arranged(p, rows=(90, 101))


def test_registry_is_keyed_by_device_and_width(native_lib):
    p = _packed(2, 8, 256, 128)
    assert find_packed_matmul("cpu", p).name == "native-simd"
    assert find_packed_matmul("cuda", p) is None  # no GPU kernel: the runtime dequantises
    with pytest.raises(KeyError, match="already registered"):
        register_packed_matmul("cpu", 2, PackedKernel("other", kernels.packed_matmul))


def test_loader_refuses_a_stale_build_and_logs_a_missing_one(native_lib, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(native, "_LIB", native._LIB)  # restored afterwards: `use` replaces the process's library
    monkeypatch.setattr(native, "_TRIED", native._TRIED)
    assert native.use(tmp_path) is None  # nothing built there
    (tmp_path / native.LIB_NAME).write_bytes(b"")
    (tmp_path / "build.json").write_text('{"fingerprint": "old"}')
    with caplog.at_level(logging.WARNING, logger="mcmoe_vl.quant.native"):
        assert native._open(tmp_path) is None
    assert "built from other sources" in caplog.text


def test_without_the_library_the_torch_path_runs_and_says_so_once(native_lib, tmp_path, monkeypatch, caplog):
    from mcmoe_vl.moe.fused import FusedMoE

    monkeypatch.setenv("MCMOE_VL_NATIVE_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_LIB", None)
    with caplog.at_level(logging.INFO, logger="mcmoe_vl.quant.native"):
        assert not kernels.available() and not kernels.available()
    assert caplog.text.count("not built") == 1
    p = _packed(2, 24, 256, 128)
    simd = QuantLinear(p, dtype=torch.float32, kernel=Kernel.SIMD)
    x = torch.randn(1, 256)
    assert torch.equal(simd(x), QuantLinear(p, dtype=torch.float32, kernel=Kernel.TORCH)(x))  # dequantised
    assert FusedMoE.build([]) is None


def _has_bf16(lib) -> bool:
    return bool(lib.mq_cpu_bf16())


def _float_paths(lib) -> list[str]:
    """The float32 SIMD paths this CPU runs (an AVX2-only CPU refuses a forced ``avx512``)."""
    return [isa.name.lower() for isa in (Isa.SCALAR, Isa.AVX2, Isa.AVX512) if isa <= lib.mq_cpu_isa()]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_bf16_tokens_match_the_float64_product(native_lib, bits, shape):
    """bfloat16 tokens: AVX512-BF16 where the CPU has it (every product exact, float32 sums), else float32 paths."""
    r, c, gs = shape
    p = _packed(bits, r, c, gs, perm=True)
    default = kernels.resolve_isa(None) == -1  # no MCMOE_VL_ISA forcing a path for the process
    want = Isa.AVX512_BF16 if default and _has_bf16(native_lib) and gs % (64 if bits == 4 else 128) == 0 else None
    for t in (1, 2, 3, 8, 17):
        x = torch.randn(t, c).bfloat16()
        y, used = kernels.packed_matmul(x, p, return_isa=True)
        _check_close(y, x, p)  # x.double() is the bf16 token exactly
        if want is not None:
            assert used == want
        else:
            assert used != Isa.AVX512_BF16
        for isa in _float_paths(native_lib):  # every float32 path this CPU has, on the same bf16 token
            forced, ran = kernels.packed_matmul(x, p, isa=isa, return_isa=True)
            assert ran != Isa.AVX512_BF16
            _check_close(forced, x, p)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(33, 2304, 128), (9, 1024, 256)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_decode_of_whole_groups(native_lib, bits, shape):
    """AVX512-BF16 decode when every group is whole (the row kernel with per-16-group scale vectors, and two rows
    at a time at 1 bit): more than 16 groups, several blocks per group, an odd row count, zero points."""
    if not _has_bf16(native_lib):
        pytest.skip("the CPU has no AVX512-BF16")
    r, c, gs = shape
    for perm in (False, True):
        p = _packed(bits, r, c, gs, perm=perm, seed=3)
        for t in (1, 2, 3):
            x = torch.randn(t, c).bfloat16()
            y, used = kernels.packed_matmul(x, p, isa="avx512_bf16", return_isa=True)
            assert used == Isa.AVX512_BF16
            _check_close(y, x, p)


def test_bf16_path_refuses_float_tokens(native_lib):
    p = _packed(2, 8, 256, 128)
    with pytest.raises(ValueError, match="bfloat16 tokens"):
        kernels.packed_matmul(torch.randn(1, 256), p, isa="avx512_bf16")
    if not _has_bf16(native_lib):
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            kernels.packed_matmul(torch.randn(1, 256).bfloat16(), p, isa="avx512_bf16")


@pytest.mark.slow
def test_build_without_the_bf16_path_when_the_compiler_cannot(native_lib, tmp_path, monkeypatch):
    """An older compiler that rejects -mavx512bf16 still builds every other path; bf16 tokens run float32 ones."""
    monkeypatch.setitem(native.SOURCES, "mq_avx512bf16.c", ["-mno-such-isa-flag"])
    if "mq_avx512bf16.c" not in native.OPTIONAL:
        pytest.skip("not an x86 build")
    native.build(tmp_path)
    lib = native.load(tmp_path)
    assert lib is not None and lib.mq_cpu_bf16() == 0
    monkeypatch.setattr(native, "_LIB", lib)
    p = _packed(2, 40, 256, 128)
    x = torch.randn(3, 256).bfloat16()
    y, used = kernels.packed_matmul(x, p, return_isa=True)
    assert used != Isa.AVX512_BF16
    _check_close(y, x, p)


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        native.build(tmp_path / "out")
    assert native.main(["build", "--out", str(tmp_path / "out")]) == 1


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("perm", [False, True], ids=["natural", "act-order"])
def test_blocked_product_is_the_bf16_weight_product(native_lib, bits, perm):
    """Register-blocked product (bf16 tokens, AVX512-BF16): x @ bf16(W)^T in float32, for every token count that
    exercises the 4-token tiles and the 2 / 1 remainders, row counts with a partial 4-row tile, and a partial last
    group (a tail shorter than the block)."""
    if not native_lib.mq_cpu_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    for r, c in ((33, 328), (16, 256), (7, 640)):
        p = _packed(bits, r, c, 128, perm=perm)
        wb = p.dequantize(torch.bfloat16).double()  # torch's bf16 rounding of the dequantised weight
        for t in (1, 2, 3, 5, 9, 32):
            x = torch.randn(t, c).bfloat16()
            y = kernels.blocked_matmul(x, p)
            ref = x.double() @ wb.t()
            bound = x.double().abs() @ wb.abs().t()
            assert y.dtype == torch.float32 and y.shape == (t, r) and ref.abs().max() > 1
            assert ((y.double() - ref).abs() <= 2e-6 * bound + 1e-30).all(), (r, c, t, (y.double() - ref).abs().max())
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.blocked_matmul(torch.randn(3, 256), _packed(bits, 8, 256, 128))
    with pytest.raises(RuntimeError, match="group size"):
        kernels.blocked_matmul(torch.randn(3, 256).bfloat16(), _packed(bits, 8, 256, 32))


def test_cpu_matmul_dispatch_by_token_count(native_lib, monkeypatch):
    calls = []
    for name in ("packed_matmul", "blocked_matmul", "panel_matmul", "prefill_matmul"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, (lambda n, f: lambda *a, **k: calls.append(n) or f(*a, **k))(name, real))
    p = _packed(2, 40, 256, 128)  # a small matrix: the blocked product up to BLOCKED_MAX_TOKENS_SMALL tokens
    odd = _packed(2, 40, 320, 128)  # columns not a multiple of 128 (a partial last group): no panel GEMM
    bf16 = bool(native_lib.mq_cpu_bf16())
    cases = ((p, 1, torch.bfloat16, "packed_matmul"),
             (p, 3, torch.bfloat16, "blocked_matmul" if bf16 else "prefill_matmul"),
             (p, kernels.BLOCKED_MAX_TOKENS_SMALL + 1, torch.bfloat16, "panel_matmul" if bf16 else "prefill_matmul"),
             (p, 130, torch.bfloat16, "panel_matmul" if bf16 else "prefill_matmul"),
             (odd, kernels.BLOCKED_FALLBACK_MAX_TOKENS, torch.bfloat16,
              "blocked_matmul" if bf16 else "prefill_matmul"),
             (odd, kernels.BLOCKED_FALLBACK_MAX_TOKENS + 1, torch.bfloat16, "prefill_matmul"),
             (p, 3, torch.float32, "prefill_matmul"), (p, 2, torch.float32, "packed_matmul"))
    for q, t, dtype, want in cases:
        calls.clear()
        kernels.cpu_matmul(torch.randn(t, q.meta.cols).to(dtype), q)
        assert calls == [want], (t, dtype, calls)
