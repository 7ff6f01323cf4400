"""Weight formats and their exact packed byte cost.

A format is chosen per expert matrix by the allocator; `packed_shapes` is the single source of
truth for what `pack()` writes, so `packed_nbytes` equals the written bytes to the byte.

Layout of one [out, in] matrix (groups run along the input dim, G = ceil(in / group)):
  keep     weight   fp16  [out, in]
  int{b}   qweight  uint8 [out, ceil(in * b / 8)]   codes packed LSB-first along each row
           scales   fp16  [out, G]
           zeros    fp16  [out, G]                  asymmetric only (sym: implicit 2^(b-1))
  ternary  qweight  uint8 [out, ceil(in / 5)]       5 trits per byte (3^5 = 243 <= 256)
           scales   fp16  [out, G]
  q4_k ... qweight  uint8 [out, in / block * bytes] the rows of a GGUF tensor of that ggml type (quantize/ggml.py:
                                                    blocks of 32 or 256 weights with their scales inside; group
                                                    size and symmetry do not apply)
  drop     nothing (expert removed, router masked)
"""
from dataclasses import dataclass
import math

import torch

from .ggml import GGML_TYPES, GGMLType
from .scales import SCALE_DTYPES

FORMATS = ("keep", "int8", "int6", "int5", "int4", "int3", "int2", "ternary", "drop")  # this project's own formats
GGML_FORMATS = tuple(GGML_TYPES)  # the GGUF block types: q4_0 ... q6_k, tq1_0, tq2_0 (rows of whole blocks)
ALL_FORMATS = FORMATS + GGML_FORMATS  # every allocation candidate
INT_BITS = {"int8": 8, "int6": 6, "int5": 5, "int4": 4, "int3": 3, "int2": 2}
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantSpec:
    format: str                         # one of ALL_FORMATS
    group_size: int = DEFAULT_GROUP_SIZE  # along the input dim; narrower matrices use one group
    sym: bool = False                   # asymmetric by default (MC-MoE / GPTQ default)
    scale_dtype: str = "float16"        # the int scales' values: fp16, or "bfloat16" (values bf16 holds too, for a
                                        # runtime that loads them in a bf16 model's dtype); stored as fp16 either way

    def __post_init__(self):
        if self.format not in ALL_FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {', '.join(ALL_FORMATS)}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def bits(self) -> int | None:
        """16 for keep, 8/6/5/4/3/2 for the int formats, None for ternary and drop."""
        return 16 if self.format == "keep" else INT_BITS.get(self.format)

    @property
    def is_int(self) -> bool:
        return self.format in INT_BITS

    @property
    def has_zeros(self) -> bool:
        """True when zero points are stored (asymmetric int formats)."""
        return self.is_int and not self.sym

    @property
    def ggml(self) -> GGMLType | None:
        """The ggml block type of a GGUF format (q4_k, q8_0, tq2_0, ...), None for this project's own formats."""
        return GGML_TYPES.get(self.format)


def group_size_for(spec: QuantSpec, in_features: int) -> int:
    """Effective group size: a matrix narrower than the group is one group of in_features."""
    return max(1, min(spec.group_size, in_features))


def num_groups(spec: QuantSpec, in_features: int) -> int:
    """G = ceil(in / group); the last group is shorter when in is not a multiple of the group."""
    return math.ceil(in_features / group_size_for(spec, in_features))


def packed_shapes(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor pack() writes for one [out, in] matrix."""
    o, n, f = out_features, in_features, spec.format
    if f == "drop":
        return {}
    if f == "keep":
        return {"weight": ((o, n), torch.float16)}
    if spec.ggml is not None:
        return {"qweight": ((o, spec.ggml.row_bytes(n)), torch.uint8)}
    width = math.ceil(n / 5) if f == "ternary" else math.ceil(n * spec.bits / 8)
    G = num_groups(spec, n)
    shapes = {"qweight": ((o, width), torch.uint8), "scales": ((o, G), torch.float16)}
    if spec.has_zeros:
        shapes["zeros"] = ((o, G), torch.float16)
    return shapes


def packable(spec: QuantSpec, in_features: int) -> bool:
    """Can a matrix with rows of `in_features` take this format? (ggml types store whole blocks only)"""
    return spec.ggml is None or in_features % spec.ggml.block == 0


def packed_nbytes(spec: QuantSpec, out_features: int, in_features: int) -> int:
    """EXACT sum of .nbytes of the tensors pack() writes for one [out, in] matrix (padding included)."""
    return sum(math.prod(shape) * dtype.itemsize
               for shape, dtype in packed_shapes(spec, out_features, in_features).values())


def bits_per_weight(spec: QuantSpec, out_features: int, in_features: int) -> float:
    """Effective storage bits per weight, scales and zeros included."""
    return 8 * packed_nbytes(spec, out_features, in_features) / (out_features * in_features)
