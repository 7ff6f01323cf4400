"""The step (and offset) of a uniform grid that minimises the weighted squared error of rounding a group onto it.

Mapping a group's extremes onto the grid's ends (min-max) spends the grid's levels on its outliers: a group of 16
weights with one large one rounds the other fifteen coarsely. The search tries `SEARCH_STEPS` grids around the
min-max one (the group's span mapped onto qmax + delta levels, delta evenly spaced in [-SEARCH_SPREAD,
SEARCH_SPREAD]: narrower grids clip the extremes, finer steps round the rest better), rounds the group on each,
refits the step (and offset) to those codes by weighted least squares in closed form, and keeps the candidate with
the smallest error. delta = 0 is the min-max grid itself and the refit never raises a candidate's error for its
codes, so the result is never worse than min-max where every importance is positive (tested against it and
against a brute-force search).

Pure functions of (weights [..., n], importance [..., n] or None = uniform); groups along the last dimension.
`importance` is what the error is weighted by: ones for the weights' own squared error, a Hessian's diagonal
(the inputs' mean square per column) for the output error a layer sees. Weights of zero importance do not set the
min-max range the candidates start from.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SEARCH_STEPS = 11     # candidate grids per group (odd: delta = 0, the min-max grid, is one of them); 21 fits
                      # the reference MoE's experts no better (q2_k-q6_k, q4_0, q5_0: within 0.1%) at twice the time
SEARCH_SPREAD = 1.0   # delta in [-SEARCH_SPREAD, SEARCH_SPREAD] levels
_MIN_MAX = False      # set by min_max(): the plain min-max grid, for comparisons


@contextmanager
def min_max():
    """Inside this block the searches return the min-max grid itself (no candidates, no refit): the round-to-nearest
    baseline the search is measured against (evals/ggml_fit.py, tests)."""
    global _MIN_MAX
    before, _MIN_MAX = _MIN_MAX, True
    try:
        yield
    finally:
        _MIN_MAX = before


def searching_off() -> bool:
    """True inside `min_max()`: every search returns its min-max grid."""
    return _MIN_MAX


def search_deltas(steps: int, spread: float, like: torch.Tensor) -> torch.Tensor:
    if steps < 1 or steps % 2 == 0:
        raise ValueError(f"the scale search needs an odd number of candidates (got {steps})")
    return torch.linspace(-spread, spread, steps, dtype=like.dtype, device=like.device)


def weighted_sums(x: torch.Tensor, q: torch.Tensor, w: torch.Tensor | None):
    """Weighted sums of the codes q and of q * x, q * q over each group (w None: uniform)."""
    wq = q if w is None else w * q
    return wq.sum(-1), (wq * x).sum(-1), (wq * q).sum(-1)


def search_symmetric(x: torch.Tensor, qmin: int, qmax: int, importance: torch.Tensor | None = None,
                     steps: int = SEARCH_STEPS, spread: float = SEARCH_SPREAD) -> torch.Tensor:
    """Step a [...] of the grid a * q, q in [qmin, qmax] (qmin < 0 < qmax), for each group x [..., n]. The min-max
    grid maps the group's value of largest magnitude onto qmin (the longer side); a candidate maps it onto
    qmin - delta. a keeps the extreme's sign (and is 0 for an all-zero group). For codes q the best step is
    a = Sqx / Sqq with error Sxx - Sqx^2 / Sqq (S: weighted sums over the group), so no residual is formed."""
    w = None if importance is None else importance.to(x.dtype).expand_as(x)
    counted = x if w is None else torch.where(w > 0, x, torch.zeros_like(x))  # no importance: not in the range
    extreme = x.gather(-1, counted.abs().argmax(-1, keepdim=True))  # [..., 1], with its sign
    best_a = (extreme / qmin).squeeze(-1)
    if _MIN_MAX:
        return best_a
    best_gain = torch.full_like(best_a, -1.0)  # error = Sxx - gain: the largest gain wins
    for delta in search_deltas(steps, spread, x):
        inv = (qmin - delta) / torch.where(extreme == 0, 1.0, extreme)  # [..., 1]: 1 / the candidate step
        q = torch.round(x * inv).clamp_(qmin, qmax)
        _, sqx, sqq = weighted_sums(x, q, w)
        ok = sqq > 0
        a = torch.where(ok, sqx / torch.where(ok, sqq, 1.0), best_a)
        gain = torch.where(ok, sqx * a, torch.zeros_like(a))
        better = gain > best_gain
        best_a, best_gain = torch.where(better, a, best_a), torch.where(better, gain, best_gain)
    return best_a


def search_affine(x: torch.Tensor, qmax: int, importance: torch.Tensor | None = None, zero_in_range: bool = False,
                  steps: int = SEARCH_STEPS, spread: float = SEARCH_SPREAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Step a >= 0 and offset b [...] of the grid a * q + b, q in [0, qmax], for each group x [..., n].
    `zero_in_range`: the offset must be <= 0 (k-quants store it as -dmin * m with m >= 0), and the min-max grid
    spans [min(x, 0), max(x, 0)]. For codes q the error of any (a, b) is the quadratic form
    Sxx - 2 a Sqx - 2 b Sx + a^2 Sqq + 2 a b Sq + b^2 S of the group's weighted sums; (a, b) minimise it."""
    w = None if importance is None else importance.to(x.dtype).expand_as(x)
    if w is None:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:  # weights of no importance do not set the range
        lo = torch.where(w > 0, x, torch.full_like(x, float("inf"))).amin(-1, keepdim=True)
        hi = torch.where(w > 0, x, torch.full_like(x, float("-inf"))).amax(-1, keepdim=True)
        lo, hi = torch.where(lo.isinf(), 0.0, lo), torch.where(hi.isinf(), 0.0, hi)  # nothing counted
    if zero_in_range:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = hi - lo
    a_mm, b_mm = (span / qmax).squeeze(-1), lo.squeeze(-1)
    if _MIN_MAX:
        return a_mm, b_mm
    s = torch.full_like(a_mm, x.shape[-1]) if w is None else w.sum(-1)
    sx = x.sum(-1) if w is None else (w * x).sum(-1)
    best = None
    for delta in search_deltas(steps, spread, x):
        inv = (qmax + delta) / torch.where(span > 0, span, 1.0)  # [..., 1]: 1 / the candidate step
        q = torch.round((x - lo) * inv).clamp_(0, qmax)
        sq, sqx, sqq = weighted_sums(x, q, w)
        det = s * sqq - sq * sq
        ok = det > 1e-12 * (s * sqq).clamp(min=1e-30)
        a = torch.where(ok, (s * sqx - sq * sx) / torch.where(ok, det, 1.0), a_mm)
        b = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, 1.0), b_mm)
        if zero_in_range:  # offset above 0: the best step with the offset pinned at 0
            pin = b > 0
            a = torch.where(pin, torch.where(sqq > 0, sqx / torch.where(sqq > 0, sqq, 1.0), a_mm), a)
            b = torch.where(pin, torch.zeros_like(b), b)
        bad = a < 0  # codes that order the weights backwards: the candidate grid as it is
        cand = 1 / inv.squeeze(-1)
        a, b = torch.where(bad, torch.where(span.squeeze(-1) > 0, cand, 0.0), a), torch.where(bad, b_mm, b)
        err = a * (a * sqq - 2 * sqx + 2 * b * sq) + b * (b * s - 2 * sx)  # the error less Sxx (constant)
        if best is None:
            best = (a, b, err)
        else:
            better = err < best[2]
            best = tuple(torch.where(better, new, old) for new, old in zip((a, b, err), best))
    return best[0], best[1]
