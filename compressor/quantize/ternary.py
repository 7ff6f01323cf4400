"""Ternary experts (MoTE / BitNet b1.58 absmean): w_hat = s * clip(round(w / s), -1, 1), s = mean|w|
per (row, group). The grid lives in grid.py; GPTQ can also target it (gptq.py)."""
import torch

from .formats import QuantSpec
from .qweight import QuantizedWeight
from .rtn import quantize_rtn

TERNARY = QuantSpec("ternary")


def quantize_ternary(W: torch.Tensor, spec: QuantSpec = TERNARY) -> QuantizedWeight:
    """W [..., out, in] -> ternary QuantizedWeight: int8 codes in {-1, 0, 1}, fp16 scales [..., out, G]."""
    if spec.format != "ternary":
        raise ValueError(f"quantize_ternary needs a ternary spec, got {spec.format!r}")
    return quantize_rtn(W, spec)
