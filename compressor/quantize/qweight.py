"""QuantizedWeight: codes + fp16 group params, and pack / unpack to checkpoint tensors."""
from dataclasses import dataclass

import torch

from . import ggml
from .formats import QuantSpec, group_size_for, packed_shapes
from .grid import dequantize_codes, expand_groups, qrange
from .packing import pack_bits, pack_trits, unpack_bits, unpack_trits


@dataclass
class QuantizedWeight:
    spec: QuantSpec
    codes: torch.Tensor                # uint8 [..., out, in]; ternary int8 in {-1,0,1}; keep: fp16 weight;
                                       # drop: a zero-strided uint8 zero of the weight's shape; ggml: int8 codes
    scales: torch.Tensor | None = None  # fp16 [..., out, G]
    zeros: torch.Tensor | None = None   # fp16 [..., out, G], integer-valued (asym int only)
    header: dict[str, torch.Tensor] | None = None  # ggml types: each block's scales, [..., out, nb(, nsub)]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def zero_points(self) -> torch.Tensor:
        """Zero points [..., out, G] as float32 (implicit for sym and ternary)."""
        if self.zeros is not None:
            return self.zeros.float()
        z = 0 if self.spec.format == "ternary" else (qrange(self.spec)[1] + 1) // 2
        return torch.full(self.scales.shape, float(z), device=self.scales.device)

    def dequantize(self) -> torch.Tensor:
        """float32 [..., out, in]; w = (q - z) * s with the fp16-rounded s and z."""
        f = self.spec.format
        if f == "drop":
            return torch.zeros(self.shape, device=self.codes.device)
        if f == "keep":
            return self.codes.float()
        if self.spec.ggml is not None:
            return ggml.dequantize_matrix(self.spec.ggml, self.codes, self.header)
        n = self.shape[-1]
        gs = group_size_for(self.spec, n)
        s = expand_groups(self.scales.float(), gs, n)        # [..., out, in]
        z = expand_groups(self.zero_points(), gs, n)         # [..., out, in]
        return dequantize_codes(self.codes, s, z)

    def select(self, index) -> "QuantizedWeight":
        """Index the leading (expert) dims, e.g. qw.select(e) -> one [out, in] matrix."""
        pick = lambda t: None if t is None else t[index]
        header = None if self.header is None else {k: v[index] for k, v in self.header.items()}
        return QuantizedWeight(self.spec, self.codes[index], pick(self.scales), pick(self.zeros), header)


def dropped(shape, spec: QuantSpec, device: torch.device | None = None) -> QuantizedWeight:
    """A 'drop' QuantizedWeight of the given shape (no memory: a zero-strided zero)."""
    return QuantizedWeight(spec, torch.zeros((), dtype=torch.uint8, device=device).expand(*shape))


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One [out, in] matrix -> exactly the tensors to write (see formats.packed_shapes).
    Leading dims, if any, are carried through (one packed row stream per matrix row)."""
    f = qw.spec.format
    if f == "drop":
        return {}
    if f == "keep":
        return {"weight": qw.codes.to(torch.float16).contiguous()}
    if qw.spec.ggml is not None:
        return {"qweight": ggml.encode_matrix(qw.spec.ggml, qw.codes, qw.header)}
    packed = pack_trits(qw.codes) if f == "ternary" else pack_bits(qw.codes, qw.spec.bits)
    out = {"qweight": packed, "scales": qw.scales.to(torch.float16).contiguous()}
    if qw.spec.has_zeros:
        out["zeros"] = qw.zeros.to(torch.float16).contiguous()
    return out


def from_packed(tensors: dict[str, torch.Tensor], spec: QuantSpec, out_features: int, in_features: int) -> QuantizedWeight:
    """Inverse of pack(): checks names, shapes and dtypes, returns the QuantizedWeight."""
    expect = packed_shapes(spec, out_features, in_features)
    if set(tensors) != set(expect):
        raise ValueError(f"{spec.format}: expected tensors {sorted(expect)}, got {sorted(tensors)}")
    for name, (shape, dtype) in expect.items():
        t = tensors[name]
        if tuple(t.shape[-2:]) != shape or t.dtype != dtype:
            raise ValueError(f"{spec.format}: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    f, n = spec.format, in_features
    if f == "drop":
        return dropped((out_features, in_features), spec)
    if f == "keep":
        return QuantizedWeight(spec, tensors["weight"])
    if spec.ggml is not None:
        codes, header = ggml.decode_matrix(spec.ggml, tensors["qweight"], n)
        return QuantizedWeight(spec, codes, header=header)
    q = tensors["qweight"]
    codes = unpack_trits(q, n) if f == "ternary" else unpack_bits(q, spec.bits, n)
    return QuantizedWeight(spec, codes, tensors["scales"], tensors.get("zeros"))


def unpack(tensors: dict[str, torch.Tensor], spec: QuantSpec, out_features: int, in_features: int) -> torch.Tensor:
    """float32 [out, in], bit-identical to qw.dequantize() of the packed QuantizedWeight."""
    return from_packed(tensors, spec, out_features, in_features).dequantize()
