"""The step (and offset) of a uniform grid that minimises the weighted squared error of rounding a group onto it.

Mapping a group's extremes onto the grid's ends (min-max) spends the grid's levels on its outliers: a group of 16
weights with one large one rounds the other fifteen coarsely. The search tries `SEARCH_STEPS` grids around the
min-max one (the group's span mapped onto qmax + delta levels, delta evenly spaced in [-SEARCH_SPREAD,
SEARCH_SPREAD]: narrower grids clip the extremes, finer steps round the rest better), rounds the group on each,
refits the step (and offset) to those codes by weighted least squares in closed form, and keeps the candidate with
the smallest error. delta = 0 is the min-max grid itself and the refit never raises a candidate's error for its
codes, so the result is never worse than min-max (tested against it and against a brute-force search).

Pure functions of (weights [..., n], importance [..., n] or None = uniform); groups along the last dimension.
`importance` is what the error is weighted by: ones for the weights' own squared error, a Hessian's diagonal
(the inputs' mean square per column) for the output error a layer sees. Weights of zero importance do not set the
min-max range the candidates start from.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SEARCH_STEPS = 21     # candidate grids per group (odd: delta = 0, the min-max grid, is one of them)
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


def _deltas(steps: int, spread: float, like: torch.Tensor) -> torch.Tensor:
    if steps < 1 or steps % 2 == 0:
        raise ValueError(f"the scale search needs an odd number of candidates (got {steps})")
    return torch.linspace(-spread, spread, steps, dtype=like.dtype, device=like.device)


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x) if importance is None else importance.to(x.dtype).expand_as(x)


def search_symmetric(x: torch.Tensor, qmin: int, qmax: int, importance: torch.Tensor | None = None,
                     steps: int = SEARCH_STEPS, spread: float = SEARCH_SPREAD) -> torch.Tensor:
    """Step a [...] of the grid a * q, q in [qmin, qmax] (qmin < 0 < qmax), for each group x [..., n]. The min-max
    grid maps the group's value of largest magnitude onto qmin (the longer side); a candidate maps it onto
    qmin - delta. a keeps the extreme's sign (and is 0 for an all-zero group)."""
    w = _weights(x, importance)
    counted = torch.where(w > 0, x, torch.zeros_like(x))  # weights of no importance do not set the range
    extreme = x.gather(-1, counted.abs().argmax(-1, keepdim=True))  # [..., 1], with its sign
    best_a = (extreme / qmin).squeeze(-1)
    if _MIN_MAX:
        return best_a
    best_err = None
    for delta in _deltas(steps, spread, x):
        a = extreme / (qmin - delta)  # [..., 1]
        safe = torch.where(a == 0, 1.0, a)
        q = torch.round(x / safe).clamp(qmin, qmax)
        wq = w * q
        num, den = (wq * x).sum(-1), (wq * q).sum(-1)
        refit = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), a.squeeze(-1))
        err = (w * (x - refit[..., None] * q) ** 2).sum(-1)
        if best_err is None:
            best_a, best_err = refit, err
        else:
            better = err < best_err
            best_a, best_err = torch.where(better, refit, best_a), torch.where(better, err, best_err)
    return best_a


def search_affine(x: torch.Tensor, qmax: int, importance: torch.Tensor | None = None, zero_in_range: bool = False,
                  steps: int = SEARCH_STEPS, spread: float = SEARCH_SPREAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Step a >= 0 and offset b [...] of the grid a * q + b, q in [0, qmax], for each group x [..., n].
    `zero_in_range`: the offset must be <= 0 (k-quants store it as -dmin * m with m >= 0), and the min-max grid
    spans [min(x, 0), max(x, 0)]."""
    w = _weights(x, importance)
    counted = w > 0  # weights of no importance do not set the range
    lo = torch.where(counted, x, torch.full_like(x, float("inf"))).amin(-1, keepdim=True)
    hi = torch.where(counted, x, torch.full_like(x, float("-inf"))).amax(-1, keepdim=True)
    lo, hi = torch.where(lo.isinf(), 0.0, lo), torch.where(hi.isinf(), 0.0, hi)  # nothing counted: an all-zero grid
    if zero_in_range:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = hi - lo
    if _MIN_MAX:
        return (span / qmax).squeeze(-1), lo.squeeze(-1)
    s = w.sum(-1)
    best = None
    for delta in _deltas(steps, spread, x):
        a0 = span / (qmax + delta)  # [..., 1]
        safe = torch.where(a0 > 0, a0, 1.0)
        q = torch.round((x - lo) / safe).clamp(0, qmax)
        wq = w * q
        sl, sll, sx, slx = wq.sum(-1), (wq * q).sum(-1), (w * x).sum(-1), (wq * x).sum(-1)
        det = s * sll - sl * sl
        ok = det > 1e-12 * (s * sll).clamp(min=1e-30)
        a = torch.where(ok, (s * slx - sl * sx) / torch.where(ok, det, 1.0), a0.squeeze(-1))
        b = torch.where(ok, (sll * sx - sl * slx) / torch.where(ok, det, 1.0), lo.squeeze(-1))
        if zero_in_range:  # offset above 0: the best step with the offset pinned at 0
            pin = b > 0
            a = torch.where(pin, torch.where(sll > 0, slx / torch.where(sll > 0, sll, 1.0), a0.squeeze(-1)), a)
            b = torch.where(pin, torch.zeros_like(b), b)
        bad = a < 0  # codes that order the weights backwards: keep the candidate grid as it is
        a, b = torch.where(bad, a0.squeeze(-1), a), torch.where(bad, lo.squeeze(-1), b)
        err = (w * (x - a[..., None] * q - b[..., None]) ** 2).sum(-1)
        if best is None:
            best = (a, b, err)
        else:
            better = err < best[2]
            best = tuple(torch.where(better, new, old) for new, old in zip((a, b, err), best))
    return best[0], best[1]
