"""RTN and ternary: error ordering, code ranges, fp16-exact params, batching, bad input."""
import pytest
import torch

from compressor.quantize import QuantSpec, quantize, quantize_rtn, quantize_ternary
from compressor.quantize.grid import find_params


def _W(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_falls_as_bits_rise(sym):
    W = _W(64, 300)
    err = {f: (quantize_rtn(W, QuantSpec(f, sym=sym)).dequantize() - W).pow(2).mean().item()
           for f in ("int8", "int6", "int5", "int4", "int3", "int2")}
    assert err["int8"] < err["int6"] < err["int5"] < err["int4"] < err["int3"] < err["int2"]
    assert err["int8"] < 1e-4 and err["int2"] < W.pow(2).mean().item()  # better than zeros


@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("int6", 6), ("int5", 5), ("int4", 4), ("int3", 3),
                                      ("int2", 2)])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_codes_and_params(fmt, bits, sym):
    W = _W(8, 200, seed=bits) * 3
    qw = quantize_rtn(W, QuantSpec(fmt, group_size=64, sym=sym))
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (8, 200)
    assert int(qw.codes.max()) <= 2 ** bits - 1 and int(qw.codes.max()) > 0
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (8, 4)  # ceil(200 / 64)
    assert (qw.scales > 0).all()
    if sym:
        assert qw.zeros is None
    else:
        assert qw.zeros.dtype == torch.float16 and torch.equal(qw.zeros, qw.zeros.round())
        assert qw.zeros.min() >= 0 and qw.zeros.max() <= 2 ** bits - 1
    # every weight lands within half a step of the grid unless clipped at the range edge
    step = qw.scales.float().repeat_interleave(64, -1)[:, :200]
    err = (qw.dequantize() - W).abs()
    assert (err <= 0.5 * step + 1e-6).float().mean() > 0.97


def test_asym_minmax_is_exact_at_extremes():
    W = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    qw = quantize_rtn(W, QuantSpec("int2"))                  # s = 3 / 3 = 1, z = 1
    assert qw.scales.item() == 1.0 and qw.zeros.item() == 1.0
    assert qw.dequantize().tolist() == [[-1.0, 0.0, 0.0, 2.0]]  # round(0.5) = 0 (half to even)


def test_ternary_absmean():
    W = _W(6, 40, seed=3)
    qw = quantize_ternary(W, QuantSpec("ternary", group_size=16))
    assert qw.codes.dtype == torch.int8 and set(qw.codes.unique().tolist()) <= {-1, 0, 1}
    s = torch.stack([W[:, i:i + 16].abs().mean(-1) for i in (0, 16, 32)], -1)  # [6, 3]
    assert torch.equal(qw.scales, s.half())
    expect = (W / s.half().float().repeat_interleave(16, -1)[:, :40]).round().clamp(-1, 1)
    assert torch.equal(qw.codes.float(), expect)
    assert qw.zeros is None and torch.equal(qw.dequantize(), expect * qw.scales.float().repeat_interleave(16, -1)[:, :40])


@pytest.mark.parametrize("fmt", ["int4", "int2", "ternary", "keep", "drop"])
def test_batched_equals_per_expert(fmt):
    W = _W(3, 5, 70, seed=7)
    spec = QuantSpec(fmt, group_size=32)
    qb = quantize_rtn(W, spec)
    for e in range(3):
        assert torch.equal(qb.select(e).dequantize(), quantize_rtn(W[e], spec).dequantize())


def test_zero_and_tiny_groups():
    W = torch.zeros(2, 10)
    W[1, :] = 1e-9
    for fmt in ("int4", "ternary"):
        for sym in (False, True):
            qw = quantize_rtn(W, QuantSpec(fmt, sym=sym))
            assert torch.isfinite(qw.dequantize()).all() and (qw.scales > 0).all()
            assert qw.dequantize()[0].abs().max() == 0


def test_scales_are_fp16_exact_before_codes():
    s, z = find_params(_W(4, 16, seed=1), QuantSpec("int3"))
    assert torch.equal(s, s.half().float()) and torch.equal(z, z.round())


@pytest.mark.parametrize("sym", [False, True])
def test_bfloat16_scales_are_exact_in_both_dtypes_and_nearest(sym):
    """scale_dtype bfloat16: every scale survives fp16 storage and a bf16 load unchanged, and is the bf16 rounding of
    the fp32 scale (within fp16's normal range); the codes are computed on those scales, so the weights reproduce."""
    from compressor.quantize.scales import BF16_IN_FP16_MAX, BF16_IN_FP16_MIN, round_scales

    W = _W(32, 256, seed=4) * torch.logspace(-5, 3, 32)[:, None]  # scales from below fp16's normal range to large
    spec = QuantSpec("int4", group_size=128, sym=sym, scale_dtype="bfloat16")
    qw = quantize_rtn(W, spec)
    s = qw.scales.float()
    assert torch.equal(qw.scales.to(torch.bfloat16).float(), s)  # fp16 storage -> bf16 load: unchanged
    assert (s >= BF16_IN_FP16_MIN).all() and (s <= BF16_IN_FP16_MAX).all()
    x = torch.tensor([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -9, 1e-9, 1e6, 0.3])
    assert torch.equal(round_scales(x, "bfloat16"),
                       torch.tensor([1.0, 1.0, 1 + 2 ** -7, 2 ** -14, 65280.0, 0.30078125]))  # ties to even
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantSpec("int4", scale_dtype="float32")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises(bad):
    W = _W(4, 8)
    W[1, 2] = bad
    with pytest.raises(ValueError, match="W contains non-finite"):
        quantize_rtn(W, QuantSpec("int4"))
    with pytest.raises(ValueError, match="W contains non-finite"):
        quantize_ternary(W)


def test_keep_rejects_fp16_overflow_and_dispatch_rtn():
    with pytest.raises(ValueError, match="fp16"):
        quantize_rtn(torch.full((2, 2), 1e6), QuantSpec("keep"))
    W = _W(4, 8)
    assert torch.equal(quantize(W, QuantSpec("int4")).dequantize(), quantize_rtn(W, QuantSpec("int4")).dequantize())
    with pytest.raises(ValueError, match="method"):
        quantize(W, QuantSpec("int4"), method="awq")
    with pytest.raises(ValueError, match="ternary spec"):
        quantize_ternary(W, QuantSpec("int4"))


@pytest.mark.parametrize("group_size", [16, 128])
def test_ternary_is_idempotent_on_ternary_weights(group_size):
    """A MoTE checkpoint's experts are already ternary; quantizing them again must be lossless
    (absmean alone would rescale {-s, 0, s} to {-p*s, 0, p*s}), through RTN and GPTQ alike."""
    from compressor.quantize import gptq_quantize

    torch.manual_seed(0)
    W = torch.randn(3, 24, 80)
    spec = QuantSpec("ternary", group_size)
    T = quantize_ternary(W, spec).dequantize()
    assert torch.equal(quantize_ternary(T, spec).dequantize(), T)
    X = torch.randn(200, 80)
    assert torch.equal(gptq_quantize(T, (X.T @ X).expand(3, 80, 80), spec).qweight.dequantize(), T)
