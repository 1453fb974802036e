import pytest
import torch

from mcmoe_vl.quant import packing as P

SHAPES = [(1,), (7,), (8,), (13,), (3, 5), (4, 129), (2, 3, 67), (5, 256), (0, 9), (3, 0)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_exact(bits, shape):
    g = torch.Generator().manual_seed(hash((bits, shape)) % 2**31)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = P.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], P.packed_row_bytes(shape[-1], bits))
    out = P.unpack(packed, bits, shape[-1])
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits,fn", [(1, P.pack_1bit), (2, P.pack_2bit), (3, P.pack_3bit), (4, P.pack_4bit)])
def test_true_density(bits, fn):
    codes = torch.randint(0, 1 << bits, (64, 1024), dtype=torch.uint8)
    assert fn(codes).numel() * 8 == codes.numel() * bits  # exactly `bits` bits per weight


def test_extreme_codes_and_layout():
    # all-max codes fill every bit; known layouts
    for bits in (1, 2, 3, 4):
        m = (1 << bits) - 1
        codes = torch.full((2, 16), m, dtype=torch.uint8)
        assert torch.all(P.pack(codes, bits) == 255)
    assert P.pack_2bit(torch.tensor([1, 2, 3, 0], dtype=torch.uint8)).item() == 1 | (2 << 2) | (3 << 4)
    assert P.pack_4bit(torch.tensor([5, 10], dtype=torch.uint8)).item() == 5 | (10 << 4)
    b = P.pack_3bit(torch.tensor([1, 0, 0, 0, 0, 0, 0, 7], dtype=torch.uint8)).tolist()
    assert b == [1, 0, 7 << 5]


def test_errors():
    with pytest.raises(ValueError, match="0..3"):
        P.pack_2bit(torch.tensor([4]))
    with pytest.raises(ValueError, match="supported widths"):
        P.pack(torch.tensor([1]), 5)
    with pytest.raises(TypeError, match="integer"):
        P.pack_4bit(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="bytes"):
        P.unpack_3bit(torch.zeros(4, dtype=torch.uint8), 8)
