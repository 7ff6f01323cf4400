"""Pure-torch matrix products from the packed layouts: what runs where the compiled kernels cannot (no compiler,
a device other than the CPU, `MOE_COMPRESSOR_KERNELS=torch`).

- `dequantize_into`: table-driven unpack of the codes (one gather of a [256, codes per byte] table for int2 / int4
  / int8 and ternary; shifts for int3; quantize/ggml.py's decoder for the GGUF types) and (q - z) * s per group,
  written into a caller's buffer. Equal bit for bit to quantize/qweight.unpack.
- `Int4PackLinear`: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) for int4 matrices at small row counts
  (decode). It needs its own layout (the codes re-packed plus scale-and-zero pairs in the activation dtype), which
  is kept beside the checkpoint's tensors: `extra_bytes` reports it.
- `Int8PackLinear`: `torch._weight_int8pack_mm` for int8 matrices whose rows are one group (its scales are per
  row); its int8 copy of the codes is again reported as `extra_bytes`.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ...quantize.formats import QuantSpec, group_size_for, num_groups
from ...quantize.packing import TRITS_PER_BYTE, unpack_bits
from ...quantize.qweight import unpack


@lru_cache(maxsize=None)
def _table(kind: str, device: torch.device) -> torch.Tensor:
    """byte -> its codes as float32 [256, codes per byte]: int{2,4,8} LSB-first, ternary base-3 digits - 1."""
    b = torch.arange(256, dtype=torch.int64)
    if kind == "ternary":
        digits = torch.stack([b // 3 ** i % 3 for i in range(TRITS_PER_BYTE)], -1) - 1
        return digits.float().to(device)
    bits = int(kind)
    per = 8 // bits
    return torch.stack([(b >> (bits * i)) & (2 ** bits - 1) for i in range(per)], -1).float().to(device)


def codes(q: torch.Tensor, spec: QuantSpec, n: int) -> torch.Tensor:
    """Packed rows uint8 [out, bytes] -> codes float32 [out, n] (ternary: -1, 0, 1)."""
    f = spec.format
    if f == "ternary" or spec.bits in (2, 4, 8):
        table = _table("ternary" if f == "ternary" else str(spec.bits), q.device)
        return F.embedding(q.long(), table).flatten(-2)[..., :n]
    return unpack_bits(q, spec.bits, n).float()


def dequantize_into(tensors: dict[str, torch.Tensor], spec: QuantSpec, out_features: int, in_features: int,
                    out: torch.Tensor) -> torch.Tensor:
    """The [out, in] matrix in `out` (any float dtype; computed in float32 as the format defines it)."""
    if not (spec.is_int or spec.format == "ternary"):  # keep, ggml types: the reference decoder
        return out.copy_(unpack(tensors, spec, out_features, in_features))
    n = in_features
    q = codes(tensors["qweight"], spec, n)  # [out, n]
    gs, G = group_size_for(spec, n), num_groups(spec, n)
    s = tensors["scales"].float()[..., None]  # [out, G, 1]
    if spec.format == "ternary":
        z = torch.zeros((), device=q.device)
    elif spec.has_zeros:
        z = tensors["zeros"].float()[..., None]
    else:
        z = torch.tensor(float(2 ** (spec.bits - 1)), device=q.device)
    q = F.pad(q, (0, G * gs - n)).view(out_features, G, gs)
    w = (q - z) * s  # [out, G, gs]: grid.dequantize_codes
    return out.copy_(w.flatten(-2)[..., :n])


def int8pack_fits(spec: QuantSpec, in_features: int) -> bool:
    """torch._weight_int8pack_mm takes per-row scales (one group per row) and rows of whole 16-wide tiles (other
    widths read out of bounds in torch 2.13)."""
    return spec.format == "int8" and num_groups(spec, in_features) == 1 and in_features % 16 == 0


def int4pack_group(spec: QuantSpec, out_features: int, in_features: int) -> int | None:
    """The group size torch's int4 kernel can use for this matrix: a power of two in 32..256 dividing both the
    format's group size and the row (each kernel group inside one of ours); None when there is none or the kernel
    does not take the shape (it needs whole tiles of 16 output rows)."""
    if spec.format != "int4" or out_features % 16:
        return None
    gs = group_size_for(spec, in_features)
    for g in (256, 128, 64, 32):
        if gs % g == 0 and in_features % g == 0:
            return g
    return None


class Int4PackLinear:
    """x [M, K] bfloat16 -> [M, N] through torch's int4 CPU kernel (w = (q - 8) * scale + zero)."""

    def __init__(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, out_features: int, in_features: int,
                 dtype: torch.dtype = torch.bfloat16):
        g = int4pack_group(spec, out_features, in_features)
        q = codes(tensors["qweight"], spec, in_features).to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        rep = group_size_for(spec, in_features) // g
        s = tensors["scales"].float().repeat_interleave(rep, -1)  # [N, K / g]
        z = (tensors["zeros"].float().repeat_interleave(rep, -1) if spec.has_zeros else torch.full_like(s, 8.0))
        # (q - z) * s = (q - 8) * s + (8 - z) * s
        self.scale_zeros = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).contiguous().to(dtype)  # [K / g, N, 2]
        self.group, self.dtype = g, dtype
        self.extra_bytes = self.packed.nbytes + self.scale_zeros.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.dtype), self.packed, self.group, self.scale_zeros)
        return y.to(x.dtype)


class Int8PackLinear:
    """x [M, K] -> [M, N] through `torch._weight_int8pack_mm` (per-row scales): int8 matrices of one group per
    row, w = (q - z) * s = s * (q - 128) + s * (128 - z)."""

    def __init__(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, out_features: int, in_features: int,
                 dtype: torch.dtype = torch.bfloat16):
        q = tensors["qweight"]
        self.codes = (q.to(torch.int16) - 128).to(torch.int8)
        s = tensors["scales"].float()[:, 0]
        z = tensors["zeros"].float()[:, 0] if spec.has_zeros else torch.full_like(s, 128.0)
        self.scales, self.offset, self.dtype = s.to(dtype), (s * (128 - z)), dtype
        self.extra_bytes = self.codes.nbytes + self.scales.nbytes + self.offset.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.to(self.dtype)
        y = torch._weight_int8pack_mm(xd, self.codes, self.scales).float()
        return (y + x.float().sum(-1, keepdim=True) * self.offset).to(x.dtype)
