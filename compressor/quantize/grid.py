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

Given an importance per column (the calibration inputs' mean square: `quantization.method: imatrix`), the int grids'
scales are searched instead (`searched_params`): the step that minimises the importance-weighted rounding error,
zero points kept integer; the min-max grid is one of the candidates, so it is never worse than min-max.
"""
import torch

from .formats import QuantSpec, group_size_for
from . import scale_search
from .scale_search import SEARCH_SPREAD, SEARCH_STEPS, search_deltas, weighted_sums
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


def searched_params(x: torch.Tensor, spec: QuantSpec, importance: torch.Tensor, steps: int = SEARCH_STEPS,
                    spread: float = SEARCH_SPREAD) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., out, g], importance broadcastable to x (>= 0) -> scale, zero [..., out] of an int grid, the pair
    among `steps` candidates with the least importance-weighted squared rounding error sum(w (x - x_hat)^2).

    Candidate delta maps the group's span onto maxq + delta levels (delta = 0 is `find_params` itself, its zero
    point with it); its codes fix the zero point z, the step is refitted to them by weighted least squares
    (s = sum w x (q - z) / sum w (q - z)^2), rounded as every scale is, and the group is rounded again on the rounded
    grid. Every candidate is scored by the error of what would be written, so the choice is never worse than
    min-max. Ternary keeps its absmean scale (MoTE's grid by design)."""
    s0, z0 = find_params(x, spec)
    if spec.format == "ternary" or scale_search.searching_off():
        return s0, z0
    x, w = x.float(), importance.float().expand_as(x)
    qmin, qmax = qrange(spec)

    def error(s, z):
        q = quantize_codes(x, s[..., None], z[..., None], spec)
        return (w * (x - dequantize_codes(q, s[..., None], z[..., None])).pow(2)).sum(-1)

    best_s, best_z, best_err = s0, z0, error(s0, z0)
    span = (s0 * qmax)[..., None]  # the min-max grid's range (2 absmax for sym, max - min with 0 in range for asym)
    lo = -z0[..., None] * s0[..., None]
    for delta in search_deltas(steps, spread, x):
        if delta == 0:
            continue  # the min-max grid, scored above
        step = span / (qmax + delta)
        z = z0[..., None] if spec.sym else torch.round(-lo / step).clamp(qmin, qmax)
        q = (torch.round(x / step) + z).clamp(qmin, qmax) - z  # [..., g] signed codes about the zero point
        _, sqx, sqq = weighted_sums(x, q, w)
        fit = torch.where((sqq > 0) & (sqx > 0), sqx / torch.where(sqq > 0, sqq, 1.0), step.squeeze(-1))
        s, z = round_scales(fit, spec.scale_dtype), z.squeeze(-1)
        err = error(s, z)
        better = err < best_err
        best_s, best_z, best_err = (torch.where(better, new, old) for new, old in
                                    ((s, best_s), (z, best_z), (err, best_err)))
    return best_s, best_z


def group_params(W: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> scales, zeros [..., out, G], every group from W's own values: min-max, or searched for the
    least rounding error weighted by `importance` [..., 1 or out, in] (each column's weight; see searched_params)."""
    gs = group_size_for(spec, W.shape[-1])
    if importance is None:
        params = [find_params(W[..., i:i + gs], spec) for i in range(0, W.shape[-1], gs)]
    else:
        params = [searched_params(W[..., i:i + gs], spec, importance[..., i:i + gs]) for i in range(0, W.shape[-1], gs)]
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
