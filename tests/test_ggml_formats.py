"""GGML block types (quantize/ggml.py) against gguf-py, the library llama.cpp's Python side reads GGUF with: every
type's bytes dequantize there to exactly our weights, the byte counts are gguf's, and GPTQ on a type's blocks is
what gets written."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from compressor.quantize import GGML_FORMATS, QuantSpec, from_packed, gptq_quantize, hessian_error, pack  # noqa: E402
from compressor.quantize import packed_nbytes, quantize_rtn  # noqa: E402
from compressor.quantize.ggml import GGML_TYPES, formats_for_width  # noqa: E402


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 3
    W[..., 0, :40] = 0.0          # an all-zero block start (sub-blocks with nothing in them)
    W[..., -1, :] = 0.25          # a constant row
    return W


def _gguf_dequantize(raw: torch.Tensor, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(raw.numpy(), GGMLQuantizationType[GGML_TYPES[fmt].gguf])


@pytest.mark.parametrize("fmt", GGML_FORMATS)
def test_type_table_matches_gguf(fmt):
    t = GGML_TYPES[fmt]
    gt = GGMLQuantizationType[t.gguf]
    assert t.type_id == int(gt)
    assert (t.block, t.nbytes) == GGML_QUANT_SIZES[gt]


@pytest.mark.parametrize("fmt", GGML_FORMATS)
def test_rtn_bytes_dequantize_in_gguf_to_our_weights_exactly(fmt):
    W = _weights((2, 5, 512))  # two experts, 5 rows, two 256-blocks per row
    qw = quantize_rtn(W, QuantSpec(fmt))
    raw = pack(qw)["qweight"]
    assert raw.dtype == torch.uint8 and raw.shape == (2, 5, GGML_TYPES[fmt].row_bytes(512))
    assert raw[0].numel() == packed_nbytes(QuantSpec(fmt), 5, 512)
    assert tuple(raw.shape[-1:]) == gguf.quants.quant_shape_to_byte_shape((512,), GGMLQuantizationType[GGML_TYPES[fmt].gguf])
    ours = qw.dequantize()
    assert np.array_equal(_gguf_dequantize(raw, fmt), ours.numpy())  # bit for bit
    back = from_packed({"qweight": raw[1]}, QuantSpec(fmt), 5, 512)
    assert torch.equal(back.codes, qw.codes[1]) and torch.equal(back.dequantize(), ours[1])
    rel = float((ours - W).pow(2).sum() / W.pow(2).sum())
    assert rel < {"tq1_0": 0.3, "tq2_0": 0.3, "q2_k": 0.15, "q3_k": 0.05}.get(fmt, 0.012)  # a sane grid, not garbage


@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q4_k", "q6_k", "q4_0", "q5_1", "q8_0", "tq2_0"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_ggml_blocks_beats_rtn_and_is_what_is_written(fmt, act_order):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.4 * torch.randn(256, 256, generator=g))
    H = X.T @ X
    W = _weights((16, 256), seed=2)
    spec = QuantSpec(fmt)
    res = gptq_quantize(W, H, spec, act_order=act_order)
    rtn = quantize_rtn(W, spec)
    assert float(res.error[0]) < 0.9 * float(hessian_error(W, rtn.dequantize(), H)[0])
    raw = pack(res.qweight)["qweight"]
    assert np.array_equal(_gguf_dequantize(raw, fmt), res.qweight.dequantize().numpy())


def test_ternary_blocks_of_256_map_losslessly():
    """A ternary matrix with one scale per 256 weights (a MoTE expert with group 256) is exactly TQ1_0 / TQ2_0."""
    g = torch.Generator().manual_seed(3)
    s = (torch.rand(4, 2, 1, generator=g) + 0.5).half().float()
    W = (torch.randint(-1, 2, (4, 2, 256), generator=g).float() * s).flatten(-2)
    for fmt in ("tq1_0", "tq2_0"):
        qw = quantize_rtn(W, QuantSpec(fmt))
        assert torch.equal(qw.dequantize(), W)
        assert np.array_equal(_gguf_dequantize(pack(qw)["qweight"], fmt), W.numpy())


def test_rows_must_be_whole_blocks():
    assert formats_for_width(576) == ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
    assert set(formats_for_width(1536)) == set(GGML_FORMATS)
    with pytest.raises(ValueError, match=r"q4_k stores rows in blocks of 256 weights; a row of 576 .*q4_0"):
        quantize_rtn(torch.randn(3, 576), QuantSpec("q4_k"))
