"""Quantization grids: per-(row, group) scale / zero point and the elementwise maps.

Every format is q = clamp(round(w / s) + z, qmin, qmax) and w_hat = (q - z) * s, in float32,
with s and z rounded to fp16 *before* codes are computed, so a packed checkpoint reproduces
w_hat bit for bit (int scales: to values bf16 holds too when spec.scale_dtype is "bfloat16", scales.round_scales).
  int asym  min-max over the group with 0 kept in range, s = (max - min) / maxq,
            z = round(-min / s) in [0, maxq]                               (GPTQ / MC-MoE)
  int sym   s = 2 * absmax / maxq, z = 2^(bits-1) implicit, never stored   (GPTQ's sym grid)
  ternary   s = mean|w| (absmean, BitNet b1.58 / MoTE), z = 0, q in {-1, 0, 1}; a group already
            in {-m, 0, m} (a MoTE checkpoint) keeps s = m, so ternary quantization is idempotent
An all-zero group gets a harmless unit range (as in GPTQ), so s > 0 always.
"""
import torch

from .formats import QuantSpec, group_size_for
from .scales import FP16_MAX, FP16_TINY, fp16_round, round_scales, ternary_scale  # noqa: F401 (re-exported)


def qrange(spec: QuantSpec) -> tuple[int, int]:
    """Integer code range [qmin, qmax] of the format."""
    if spec.format == "ternary":
        return -1, 1
    if not spec.is_int:
        raise ValueError(f"format {spec.format!r} has no quantization grid")
    return 0, 2 ** spec.bits - 1


def find_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., out, g] (one group of columns) -> scale, zero [..., out], float32, fp16-exact."""
    x = x.float()
    if spec.format == "ternary":
        s = ternary_scale(x)  # [..., out]
        return s, torch.zeros_like(s)
    maxq = qrange(spec)[1]
    xmin, xmax = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)  # [..., out]
    if spec.sym:
        a = torch.maximum(-xmin, xmax)
        s = round_scales(2 * torch.where(a == 0, 1.0, a) / maxq, spec.scale_dtype)
        return s, torch.full_like(s, (maxq + 1) // 2)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    s = round_scales((xmax - xmin) / maxq, spec.scale_dtype)
    return s, torch.round(-xmin / s).clamp(0, maxq)


def group_params(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> scales, zeros [..., out, G], every group from W's own values."""
    gs = group_size_for(spec, W.shape[-1])
    params = [find_params(W[..., i:i + gs], spec) for i in range(0, W.shape[-1], gs)]
    return torch.stack([p[0] for p in params], -1), torch.stack([p[1] for p in params], -1)


def expand_groups(p: torch.Tensor, gs: int, n: int) -> torch.Tensor:
    """Per-group params [..., out, G] -> per-column [..., out, n]."""
    return p.repeat_interleave(gs, dim=-1)[..., :n]


def quantize_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float codes (integer-valued) of w on the grid (s, z); all args broadcast together."""
    qmin, qmax = qrange(spec)
    return (torch.round(w / s) + z).clamp(qmin, qmax)


def dequantize_codes(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """w_hat = (q - z) * s in float32; the one dequantization formula of the package."""
    return (q.float() - z.float()) * s.float()
