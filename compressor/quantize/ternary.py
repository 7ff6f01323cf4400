"""Ternary experts (MoTE / BitNet b1.58 absmean): w_hat = s * clip(round(w / s), -1, 1), s = mean|w|
per (row, group). The grid lives in grid.py; GPTQ can also target it (gptq.py)."""
import torch
import torch.nn.functional as F

from .formats import DEFAULT_GROUP_SIZE, QuantSpec, group_size_for
from .qweight import QuantizedWeight
from .rtn import quantize_rtn

TERNARY = QuantSpec("ternary")


def quantize_ternary(W: torch.Tensor, spec: QuantSpec = TERNARY) -> QuantizedWeight:
    """W [..., out, in] -> ternary QuantizedWeight: int8 codes in {-1, 0, 1}, fp16 scales [..., out, G]."""
    if spec.format != "ternary":
        raise ValueError(f"quantize_ternary needs a ternary spec, got {spec.format!r}")
    return quantize_rtn(W, spec)


def ternary_grid(W: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """W [E, out, in] (or [out, in]) -> (values, scales), BoolTensors [E] (or 0-d): `values` where every (row, group)
    holds at most the three values {-s, 0, s}; `scales` where every such s is finite and fp16-representable (what the
    ternary format and the GGUF ternary types store). A checkpoint ternarized with group g is ternary for every group
    size dividing g (and for g itself)."""
    squeeze = W.dim() == 2
    W = W[None] if squeeze else W
    n = W.shape[-1]
    gs = group_size_for(QuantSpec("ternary", group_size), n)
    Wp = F.pad(W.float(), (0, (-n) % gs))
    Wg = Wp.reshape(*Wp.shape[:-1], -1, gs)  # [E, out, G, gs], zero-padded
    a = Wg.abs()
    m = a.amax(-1, keepdim=True)  # [E, out, G, 1]
    values = ((a == 0) | (a == m)).flatten(1).all(1)
    scales = (torch.isfinite(m) & (m.half().float() == m)).flatten(1).all(1)
    return (values[0], scales[0]) if squeeze else (values, scales)


def is_ternary(W: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """W [E, out, in] (or [out, in]) -> BoolTensor [E] (or 0-d): True where every (row, group) holds at
    most the three values {-s, 0, s}, with s finite and fp16-representable (so packing is lossless)."""
    values, scales = ternary_grid(W, group_size)
    return values & scales
