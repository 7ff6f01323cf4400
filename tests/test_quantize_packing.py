"""Bit / trit packing, exact byte cost and bit-identical pack -> unpack for every format."""
import math

import pytest
import torch

from compressor.quantize import (FORMATS, QuantSpec, from_packed, pack, pack_bits, pack_trits,
                                 packed_nbytes, quantize_rtn, unpack, unpack_bits, unpack_trits)

SHAPES = [(1, 1), (3, 7), (5, 13), (2, 129), (4, 300), (3, 256)]  # in < group, ragged, exact


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 13, 129])
def test_pack_bits_round_trip(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 2 ** bits, (2, 3, n), dtype=torch.uint8, generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, math.ceil(n * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 13, 129])
def test_pack_trits_round_trip(n):
    trits = torch.randint(-1, 2, (3, n), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    packed = pack_trits(trits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(n / 5))
    assert torch.equal(unpack_trits(packed, n), trits)


def test_bit_layout_is_lsb_first_stream():
    # 3-bit codes 1..7,0 -> stream bits 001 010 011 100 101 110 111 000 (LSB first) -> 3 bytes
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [0b11010001, 0b01011000, 0b00011111]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    assert pack_trits(torch.tensor([1, -1, 0, 0, 0], dtype=torch.int8)).tolist() == [2 + 0 * 3 + 1 * 9 + 27 + 81]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_bit_layout_is_the_little_endian_stream(bits):
    """Against brute force: code i at stream bits [bits * i, bits * (i + 1)) of one little-endian integer."""
    codes = torch.randint(0, 2 ** bits, (37,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    stream = sum(int(c) << (bits * i) for i, c in enumerate(codes.tolist()))
    assert pack_bits(codes, bits).tolist() == list(stream.to_bytes(math.ceil(37 * bits / 8), "little"))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="trits"):
        pack_trits(torch.tensor([2], dtype=torch.int8))


def _specs():
    for f in FORMATS:
        for sym in (False, True):
            yield QuantSpec(f, group_size=128, sym=sym)
    yield QuantSpec("int4", group_size=5)
    yield QuantSpec("ternary", group_size=32)


@pytest.mark.parametrize("spec", list(_specs()), ids=str)
def test_packed_nbytes_exact_and_unpack_bit_identical(spec):
    for out, n in SHAPES:
        W = torch.randn(out, n, generator=torch.Generator().manual_seed(out * 1000 + n))
        qw = quantize_rtn(W, spec)
        tensors = pack(qw)
        assert sum(t.nbytes for t in tensors.values()) == packed_nbytes(spec, out, n)
        assert all(t.is_contiguous() for t in tensors.values())
        w = unpack(tensors, spec, out, n)
        assert w.dtype == torch.float32 and w.shape == (out, n)
        assert torch.equal(w, qw.dequantize())  # bit-identical, not just close


def test_packed_nbytes_values():
    # int4 asym, [4, 300], group 128 -> G = 3: 4*150 packed + 2 * 4*3*2 params
    assert packed_nbytes(QuantSpec("int4"), 4, 300) == 600 + 48
    assert packed_nbytes(QuantSpec("int3", sym=True), 2, 7) == 2 * 3 + 2 * 1 * 2  # one group, no zeros
    assert packed_nbytes(QuantSpec("ternary"), 3, 13) == 3 * 3 + 3 * 2
    assert packed_nbytes(QuantSpec("keep"), 3, 13) == 78
    assert packed_nbytes(QuantSpec("drop"), 3, 13) == 0


def test_drop_and_keep():
    W = torch.randn(3, 13)
    assert pack(quantize_rtn(W, QuantSpec("drop"))) == {}
    assert torch.equal(unpack({}, QuantSpec("drop"), 3, 13), torch.zeros(3, 13))
    assert torch.equal(unpack(pack(quantize_rtn(W, QuantSpec("keep"))), QuantSpec("keep"), 3, 13),
                       W.half().float())


def test_from_packed_validates():
    spec = QuantSpec("int4")
    t = pack(quantize_rtn(torch.randn(3, 13), spec))
    with pytest.raises(ValueError, match="expected tensors"):
        from_packed({k: v for k, v in t.items() if k != "zeros"}, spec, 3, 13)
    with pytest.raises(ValueError, match="qweight"):
        from_packed(t, spec, 3, 15)


def test_spec_validation_and_bits():
    assert [QuantSpec(f).bits for f in FORMATS] == [16, 8, 6, 5, 4, 3, 2, None, None]
    with pytest.raises(ValueError, match="unknown format"):
        QuantSpec("int7")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec("int4", group_size=0)
