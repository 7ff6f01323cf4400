"""Every kernel path equals the dequantized dense product, for every format, group size and odd shape.

Tolerances (y against x @ W_hat^T in float64, W_hat = the format's exact dequantization):
  float32 x   |y - ref| <= 2e-5 * (|x| @ |W_hat|^T): the compiled kernels split x into two bfloat16 halves
              (hi + lo = x to 2^-16) and accumulate in float32, in another order than the reference
  bfloat16 x  2^-7 * (|x| @ |W_hat|^T): the output is rounded to bfloat16, and on the GEMM path (more rows than
              GEMV_ROWS) so is the dequantized operand, as in any bfloat16 model
and the dequantization itself (the prefill path's operand) is bit-exact, in float32, bfloat16 and float16.
"""

import pytest
import torch

from compressor.quantize import QuantSpec, pack, quantize_rtn, unpack
from compressor.quantize.formats import ALL_FORMATS, packable
from compressor.runtime import kernels
from compressor.runtime.kernels import GEMV_ROWS, Kernel, TorchPackKernel, native
from compressor.runtime.kernels.torch_paths import (Int4PackLinear, Int8PackLinear, dequantize_into, int4pack_group,
                                                    int8pack_fits)

FORMATS = [f for f in ALL_FORMATS if f != "drop"]
# (out, in, group): in not a multiple of 8 / 16 / 32 / the group, in below the group, a group not a multiple of 8,
# in = whole 128-code chunks plus a tail, rows not a multiple of the kernels' 4-row blocks
SHAPES = [(5, 13, 32), (9, 100, 64), (37, 256, 128), (16, 576, 128), (6, 60, 20), (3, 512, 32), (64, 512, 256)]
LIB = native.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"compiled kernels unavailable: {native.unavailable_reason()}")


def packed(fmt: str, n_out: int, n_in: int, gs: int, sym: bool = False, seed: int = 0):
    spec = QuantSpec(fmt, gs, sym)
    W = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed))
    W[0, : min(n_in, 5)] = 0.0  # a row that starts with zeros
    tensors = pack(quantize_rtn(W, spec))
    return spec, tensors, unpack(tensors, spec, n_out, n_in)


def cases():
    for fmt in FORMATS:
        for n_out, n_in, gs in SHAPES:
            if packable(QuantSpec(fmt), n_in):
                yield fmt, n_out, n_in, gs


def check_product(kernel, W: torch.Tensor, dtype: torch.dtype, rows: int, seed: int = 1) -> None:
    x = torch.randn(rows, W.shape[1], generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = kernel(x)
    assert y.dtype == dtype and y.shape == (rows, W.shape[0])
    ref = x.double() @ W.double().T
    bound = (2e-5 if dtype == torch.float32 else 2.0 ** -7) * (x.double().abs() @ W.double().abs().T) + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"


@needs_lib
@pytest.mark.parametrize("fmt,n_out,n_in,gs", list(cases()))
def test_native_kernel_equals_dequantized_product(fmt, n_out, n_in, gs):
    for sym in ([False, True] if QuantSpec(fmt).is_int else [False]):
        spec, tensors, W = packed(fmt, n_out, n_in, gs, sym)
        k = kernels.kernel_for(tensors, spec, n_out, n_in)
        assert k.path == "native" and k.extra_bytes == 0
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (1, 2, 3, 5, GEMV_ROWS + 3):  # the decode kernel (1-2 rows per pass), then the GEMM path
                check_product(k, W, dtype, rows)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(k.dequantize_into(torch.empty(n_out, n_in, dtype=dtype)), W.to(dtype))


# the compiled kernels' lower tiers, built for an older -march: a CPU with AVX512-BF16 runs them too
TIERS = {"scalar": ("x86-64-v2", 0), "avx512f": ("skylake-avx512", 1)}


@pytest.fixture(scope="module", params=list(TIERS))
def tier_lib(request, tmp_path_factory):
    if LIB is None or LIB.mc_tier() < 2:
        pytest.skip("the lower tiers are run where the CPU has the top tier's instructions (AVX512-BF16)")
    march, tier = TIERS[request.param]
    lib = native.build_for(march, tmp_path_factory.mktemp(request.param) / "packed.so")
    assert lib.mc_tier() == tier
    return lib


@pytest.mark.parametrize("fmt", FORMATS)
def test_lower_tiers_equal_the_dequantized_product(tier_lib, fmt):
    """The AVX512F and scalar code of every format (this machine's own build runs the AVX512-BF16 code): the
    dequantization bit-exact, the product within the float32 bound."""
    for n_out, n_in, gs in SHAPES:
        if not packable(QuantSpec(fmt), n_in):
            continue
        spec, tensors, W = packed(fmt, n_out, n_in, gs)
        mat = kernels._mat(tensors, spec, n_out, n_in)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(native.dequant_into(tier_lib, mat, torch.empty(n_out, n_in, dtype=dtype)), W.to(dtype))
        for rows in (1, 2, 5):
            check_product(lambda x: native.gemv(tier_lib, mat, x.contiguous()), W, torch.float32, rows)


@pytest.mark.parametrize("fmt,n_out,n_in,gs", list(cases()))
def test_torch_dequantization_is_exact(fmt, n_out, n_in, gs):
    spec, tensors, W = packed(fmt, n_out, n_in, gs)
    assert torch.equal(dequantize_into(tensors, spec, n_out, n_in, torch.empty(n_out, n_in)), W)
    check_product(Kernel(tensors, spec, n_out, n_in), W, torch.float32, 3)


@pytest.mark.parametrize("n_out,n_in,gs", [(32, 256, 128), (16, 576, 128), (48, 64, 64), (16, 96, 32)])
def test_torch_int4pack_kernel(n_out, n_in, gs):
    spec, tensors, W = packed("int4", n_out, n_in, gs)
    assert int4pack_group(spec, n_out, n_in) is not None
    k = TorchPackKernel(Int4PackLinear(tensors, spec, n_out, n_in), "torch-int4pack", tensors, spec, n_out, n_in)
    assert k.extra_bytes > 0  # its own layout, reported
    # scale-and-zero pairs held in bfloat16 (the kernel's dtype): 2^-8 relative on each group's terms
    x = torch.randn(2, n_in).bfloat16()
    ref = x.double() @ W.double().T
    bound = 2.0 ** -6 * (x.double().abs() @ W.double().abs().T)
    assert ((k(x).double() - ref).abs() <= bound).all()


def test_torch_packed_kernels_refuse_shapes_they_cannot_take():
    assert int4pack_group(QuantSpec("int4", 128), 33, 256) is None  # rows not in tiles of 16
    assert int4pack_group(QuantSpec("int4", 128), 32, 100) is None  # no power-of-two group divides the row
    assert int4pack_group(QuantSpec("int4", 128), 32, 576) == 64  # 576 = 4.5 x 128: groups of 64 inside ours
    assert not int8pack_fits(QuantSpec("int8", 128), 256)  # two groups per row, one scale per row in the kernel
    assert not int8pack_fits(QuantSpec("int8", 128), 100)


def test_torch_int8pack_kernel():
    spec, tensors, W = packed("int8", 24, 96, 128)
    k = TorchPackKernel(Int8PackLinear(tensors, spec, 24, 96), "torch-int8pack", tensors, spec, 24, 96)
    x = torch.randn(3, 96).bfloat16()
    ref = x.double() @ W.double().T
    assert ((k(x).double() - ref).abs() <= 2.0 ** -6 * (x.double().abs() @ W.double().abs().T)).all()


def test_kernel_follows_its_tensors():
    """A kernel is rebuilt when its matrix's tensors are replaced (a device move, a new state dict) or, for a derived
    layout, changed in place."""
    from compressor.runtime.experts import PackedMatrix

    spec, tensors, W = packed("int4", 32, 256, 128)
    m = PackedMatrix(spec, 32, 256, tensors)
    k = m.kernel()
    assert m.kernel() is k
    m.qweight = m.qweight.clone()
    assert m.kernel() is not k
    k2 = TorchPackKernel(Int4PackLinear(m.tensors(), spec, 32, 256), "torch-int4pack", m.tensors(), spec, 32, 256)
    assert k2.current(m.tensors())
    m.qweight.add_(0)
    assert not k2.current(m.tensors())


def test_without_compiled_kernels_the_torch_paths_run(monkeypatch):
    monkeypatch.setenv(native.ENV, "torch")
    native.library.cache_clear()
    try:
        assert native.library() is None and "torch" in native.unavailable_reason()
        spec, tensors, W = packed("int3", 16, 200, 64)
        k = kernels.kernel_for(tensors, spec, 16, 200)
        assert k.path == "torch"
        check_product(k, W, torch.float32, 2)
        spec, tensors, W = packed("int4", 32, 256, 128)
        assert kernels.kernel_for(tensors, spec, 32, 256, torch.bfloat16).path == "torch-int4pack"
    finally:
        monkeypatch.delenv(native.ENV)
        native.library.cache_clear()


@needs_lib
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_linear_layers_take_the_compiled_decode_path(dtype):
    from torch import nn

    from compressor.runtime import linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 37), nn.Linear(37, 64, bias=False)).to(dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4, 100).to(dtype)
    assert x.numel() // 100 > GEMV_ROWS
    with torch.no_grad():
        want = model(x)
        assert linear.accelerate(model) == 2
        for rows in (x[:1, :1], x[:1, :3], x[:2]):  # 1, 3 and 8 rows: the compiled product
            W = [m.weight.double() for m in model]
            ref = (rows.double() @ W[0].T + model[0].bias.double()).to(dtype).double() @ W[1].T
            bound = 2.0 ** -7 * ((rows.double().abs() @ W[0].abs().T + model[0].bias.double().abs()) @ W[1].abs().T)
            assert ((model(rows).double() - ref).abs() <= bound).all()
        assert torch.equal(model(x), want)  # 12 rows, more than GEMV_ROWS: torch's own product, unchanged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    linear.restore(model)
    assert "forward" not in model[0].__dict__


@pytest.mark.parametrize("fmt", ["int4", "int3", "ternary"])
def test_a_matrix_on_another_device_takes_the_torch_path(fmt):
    """The compiled kernels read host memory: a matrix whose tensors are on another device (tests/elsewhere.py, which
    fails where a GPU would on mixed devices) gets the pure-torch path there, equal to the host's; activations on
    another device than the matrix meet the dequantized weights there."""
    from elsewhere import DEVICE, elsewhere_factories

    from compressor.runtime.experts import PackedMatrix

    spec, tensors, W = packed(fmt, 16, 200, 64)
    m = PackedMatrix(spec, 16, 200, {n: t.clone() for n, t in tensors.items()})
    x = torch.randn(12, 200, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), elsewhere_factories():
        host = m(x)
        y_elsewhere = m(x.to(DEVICE))  # activations elsewhere, matrix on the host
        assert y_elsewhere.device == DEVICE
        m.to(DEVICE)
        k = m.kernel(torch.float32)
        assert k.path == "torch"
        for rows in (1, 12):  # the decode and the prefill sizes
            y = m(x[:rows].to(DEVICE))
            assert y.device == DEVICE
            torch.testing.assert_close(y.cpu(), host[:rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_elsewhere.cpu(), host, rtol=1e-5, atol=1e-5)
