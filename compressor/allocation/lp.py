"""Per-item format allocation under a byte budget: a multiple-choice knapsack solved as a MIP.

    minimise    sum_{i,f} x[i,f] * cost[i,f]
    subject to  sum_f x[i,f] = 1                                   for every item i
                sum_{i,f} x[i,f] * nbytes[i,f] <= capacity         (global cap, optional)
                sum_{i in g, f} x[i,f] * nbytes[i,f] <= group_capacity[g]   (per-group caps, optional)
                x[i,f] in {0, 1},  x[i,f] = 0 where cost[i,f] = inf

Exact reductions before the solver (they never change the optimum):
  * per item, formats that are not allowed (cost inf) or dominated (no fewer bytes than another
    format with no higher cost) are dropped;
  * per item, the smallest byte count and the smallest cost are subtracted (one format per item
    is chosen, so both are constants), and each byte row is divided by the gcd of its
    coefficients, with its right-hand side rounded down (exact for integer rows);
  * items left with one format are fixed; byte rows that cannot bind are dropped;
  * when the cheapest format of every item already fits, that is the optimum (solver "presolve").

The returned choice is verified with exact integer byte arithmetic against every cap. If solver
tolerances let a solution overshoot a cap, the model is re-solved with the cap tightened by the
overshoot, and as a last resort repaired greedily (status then says "repaired").

Pure numpy + highspy + pulp: no torch, no other compressor subpackages.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Allocation", "InfeasibleBudget", "solve_allocation", "mcmoe_cost", "prune_dominated"]

SOLVERS = ("highs", "cbc", "auto")
AUTO_CBC_MAX_VARS = 2000  # "auto" uses CBC (the declared solver) up to this many binaries, HiGHS above


@dataclass
class Allocation:
    choice: np.ndarray  # [N] int64, index of the chosen format per item
    objective: float  # sum_i cost[i, choice[i]] in the caller's units
    total_bytes: int  # sum_i nbytes[i, choice[i]], exact
    solver: str  # "highs", "cbc" or "presolve" (solved exactly without a MIP)
    seconds: float  # wall time of the whole call
    gap: float  # relative gap (objective - bound) / |objective|; 0 when proven optimal
    status: str  # "optimal", "time_limit", ... ; "+repaired" appended if a greedy repair was needed
    bound: float = float("nan")  # proven lower bound on the objective (== objective when optimal)
    group_bytes: np.ndarray | None = None  # [G] int64 bytes per group, when groups were given
    n_vars: int = 0  # binaries handed to the solver after the exact reductions
    info: dict = field(default_factory=dict)


class InfeasibleBudget(ValueError):
    """The caps cannot be met even with the smallest allowed format for every item."""

    def __init__(self, min_bytes: int, capacity: int, group: int | None = None, detail: str = ""):
        self.min_bytes = int(min_bytes)
        self.capacity = int(capacity)
        self.group = group
        where = "the budget" if group is None else f"the cap of group {group}"
        msg = (
            f"infeasible budget: {where} is {self.capacity} bytes but the smallest size reachable "
            f"with the allowed formats is {self.min_bytes} bytes ({self.min_bytes - self.capacity} bytes over)"
        )
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)


def mcmoe_cost(phi, w, eps, a: float = 1.0, b: float = 1.5) -> np.ndarray:
    """MC-MoE objective coefficients phi_i^a * w_i^b * eps[i, f]^a, shape [N, F].

    phi: [N] activation frequency, w: [N] (summed top-k) routing weight, eps: [N, F] output error
    of quantizing item i with format f. eps = inf (format not allowed) stays inf, even if phi or
    w is 0.
    """
    phi = np.asarray(phi, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    eps = np.asarray(eps, dtype=np.float64)
    if eps.ndim != 2 or phi.shape != (eps.shape[0],) or w.shape != (eps.shape[0],):
        raise ValueError(f"mcmoe_cost: expected phi [N], w [N], eps [N, F]; got {phi.shape}, {w.shape}, {eps.shape}")
    for name, arr in (("phi", phi), ("w", w), ("eps", eps)):
        if np.isnan(arr).any() or (arr < 0).any():
            raise ValueError(f"mcmoe_cost: {name} must be non-negative and not NaN")
    if not (np.isfinite(phi).all() and np.isfinite(w).all()):
        raise ValueError("mcmoe_cost: phi and w must be finite")
    blocked = np.isinf(eps)
    with np.errstate(invalid="ignore"):
        out = (phi**a * w**b)[:, None] * np.where(blocked, 0.0, eps) ** a
    out[blocked] = np.inf
    return out


def prune_dominated(cost: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """[N, F] bool: formats worth keeping. A format is dropped if it is not allowed (cost inf) or
    another format of the same item has no more bytes and no higher cost (ties keep one)."""
    cost = np.asarray(cost, dtype=np.float64)
    nbytes = np.asarray(nbytes, dtype=np.int64)
    allowed = np.isfinite(cost)
    nb_key = np.where(allowed, nbytes, np.iinfo(np.int64).max)
    c_key = np.where(allowed, cost, np.inf)
    order = np.lexsort((c_key, nb_key), axis=-1)  # by bytes, then cost
    sc = np.take_along_axis(c_key, order, axis=1)
    prev_min = np.concatenate([np.full((cost.shape[0], 1), np.inf), np.minimum.accumulate(sc, axis=1)[:, :-1]], axis=1)
    keep_sorted = np.isfinite(sc) & (sc < prev_min)
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep


def _as_int64(name: str, arr) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")


def _group_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.zeros(n_groups, dtype=np.int64)
    np.add.at(out, groups, values)
    return out


def solve_allocation(
    cost,
    nbytes,
    capacity: int | None,
    groups=None,
    group_capacity=None,
    solver: str = "highs",
    time_limit: float = 60.0,
    rel_gap: float = 1e-4,
    heuristic: bool = True,
) -> Allocation:
    """Choose one format per item minimising total cost under the byte caps (see module docstring).

    capacity: global byte cap for the N items, or None when only per-group caps apply.
    groups: [N] int in [0, G) (e.g. layer index per expert); group_capacity: [G] int byte caps.
    solver: "highs" (highspy), "cbc" (PuLP's CBC, the declared solver) or "auto".
    rel_gap: relative MIP gap at which the solver may stop (0 = prove optimality).
    heuristic: first build a greedy incumbent on each item's lower convex hull and the exact LP
        relaxation bound of every byte row; if the incumbent is within rel_gap of the bound it is
        returned (solver "hull") without a MIP, otherwise it warm-starts HiGHS.
    Raises InfeasibleBudget (a ValueError) before solving when a cap is below the smallest
    reachable size; ValueError on malformed input; RuntimeError if the solver finds no solution.
    """
    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be [N, F], got shape {cost.shape}")
    nbytes = _as_int64("nbytes", nbytes)
    if nbytes.shape != cost.shape:
        raise ValueError(f"nbytes shape {nbytes.shape} != cost shape {cost.shape}")
    n_items, n_formats = cost.shape
    if np.isnan(cost).any():
        raise ValueError("cost contains NaN")
    if np.isneginf(cost).any():
        raise ValueError("cost contains -inf (use +inf to disallow a format)")
    allowed = np.isfinite(cost)
    if n_items and not allowed.any(axis=1).all():
        bad = np.flatnonzero(~allowed.any(axis=1))
        raise ValueError(f"items {bad[:10].tolist()} have no allowed format (all costs inf)")
    if (nbytes[allowed] < 0).any():
        raise ValueError("nbytes must be non-negative")
    if capacity is not None:
        if int(capacity) != capacity:
            raise ValueError(f"capacity must be an integer number of bytes, got {capacity!r}")
        capacity = int(capacity)

    n_groups = 0
    if group_capacity is not None:
        if groups is None:
            raise ValueError("group_capacity needs groups (the group index of every item)")
        group_capacity = _as_int64("group_capacity", group_capacity).reshape(-1)
        n_groups = group_capacity.shape[0]
    if groups is not None:
        groups = _as_int64("groups", groups).reshape(-1)
        if groups.shape != (n_items,):
            raise ValueError(f"groups must be [N]={n_items}, got shape {groups.shape}")
        if n_items and groups.min() < 0:
            raise ValueError("groups must be non-negative")
        if group_capacity is not None and n_items and groups.max() >= n_groups:
            raise ValueError(f"groups has index {groups.max()} but group_capacity has only {n_groups} entries")
        if group_capacity is None:
            n_groups = int(groups.max()) + 1 if n_items else 0
    if capacity is None and group_capacity is None:
        raise ValueError("give capacity, group_capacity, or both")

    # ---- feasibility, exactly, before any solver -------------------------------------------------
    big = np.iinfo(np.int64).max
    min_b = np.where(allowed, nbytes, big).min(axis=1) if n_items else np.zeros(0, np.int64)
    min_total = int(min_b.sum())
    if capacity is not None and min_total > capacity:
        raise InfeasibleBudget(min_total, capacity)
    if group_capacity is not None:
        min_g = _group_sums(min_b, groups, n_groups)
        over = np.flatnonzero(min_g > group_capacity)
        if over.size:
            g = int(over[np.argmax(min_g[over] - group_capacity[over])])
            detail = "" if over.size == 1 else f"{over.size} groups are infeasible: {over[:20].tolist()}"
            raise InfeasibleBudget(int(min_g[g]), int(group_capacity[g]), group=g, detail=detail)

    def finish(choice, solver_name, status, bound_val, n_vars, info):
        choice = np.asarray(choice, dtype=np.int64)
        picked_b = nbytes[np.arange(n_items), choice]
        picked_c = cost[np.arange(n_items), choice]
        assert np.isfinite(picked_c).all(), "internal error: a disallowed format was chosen"
        total = int(picked_b.sum())
        gb = _group_sums(picked_b, groups, n_groups) if groups is not None else None
        assert capacity is None or total <= capacity, "internal error: global cap exceeded"
        assert group_capacity is None or (gb <= group_capacity).all(), "internal error: group cap exceeded"
        obj = math.fsum(picked_c.tolist())
        if status == "optimal" and not (bound_val <= obj):  # bound rounding noise
            bound_val = obj
        bound_val = min(bound_val, obj)
        diff = obj - bound_val
        gap = 0.0 if diff <= 1e-12 * max(abs(obj), abs(bound_val)) else diff / max(abs(obj), 1e-300)
        return Allocation(
            choice=choice, objective=obj, total_bytes=total, solver=solver_name,
            seconds=time.perf_counter() - t0, gap=float(gap), status=status, bound=float(bound_val),
            group_bytes=gb, n_vars=n_vars, info=info,
        )

    if n_items == 0:
        return finish(np.zeros(0, np.int64), "presolve", "optimal", 0.0, 0, {})

    # ---- exact reductions -----------------------------------------------------------------------
    keep = prune_dominated(cost, nbytes)
    c_keep = np.where(keep, cost, np.inf)
    best = np.argmin(c_keep, axis=1)  # cheapest format (unique after pruning)
    rows = np.arange(n_items)
    if _fits(nbytes[rows, best], capacity, groups, group_capacity, n_groups):
        lb = math.fsum(cost[rows, best].tolist())
        return finish(best, "presolve", "optimal", lb, 0, {"n_kept": int(keep.sum())})

    n_keep = keep.sum(axis=1)
    free = n_keep > 1
    small = np.argmin(np.where(keep, nbytes, big), axis=1)  # fewest bytes (== min_b)
    choice = small.copy()  # fixed items: their only format
    c_shift = cost[rows, best]  # per item: cost of its cheapest format
    const_cost = math.fsum(c_shift.tolist())

    free_idx = np.flatnonzero(free)
    item_pos = np.full(n_items, -1, dtype=np.int64)
    item_pos[free_idx] = np.arange(free_idx.size)
    vi, vf = np.nonzero(keep & free[:, None])  # row-major: sorted by item
    n_vars = vi.size
    dc = cost[vi, vf] - c_shift[vi]
    db = nbytes[vi, vf] - min_b[vi]  # >= 0, exact int64
    c_scale = float(dc.max()) if n_vars and dc.max() > 0 else 1.0
    obj = dc / c_scale

    # byte rows: (name, var mask, right-hand side after removing the constant min bytes)
    byte_rows = []
    if capacity is not None:
        rhs = capacity - min_total
        if int(np.where(keep, nbytes, 0).max(axis=1).sum()) > capacity:  # can bind
            byte_rows.append(("global", np.ones(n_vars, bool), rhs))
    if group_capacity is not None:
        min_g = _group_sums(min_b, groups, n_groups)
        max_g = _group_sums(np.where(keep, nbytes, 0).max(axis=1), groups, n_groups)
        for g in np.flatnonzero(max_g > group_capacity):
            byte_rows.append((f"group{g}", groups[vi] == g, int(group_capacity[g] - min_g[g])))

    rows_spec = []  # (mask, coeff int64, gcd, rhs_scaled)
    for name, mask, rhs in byte_rows:
        m = mask & (db > 0)
        coef = db[m]
        gcd = int(np.gcd.reduce(coef)) if coef.size else 1
        rows_spec.append((name, m, coef // gcd, gcd, rhs))

    info = {"n_kept": int(keep.sum()), "n_free_items": int(free_idx.size), "byte_rows": len(rows_spec)}
    use = solver
    if solver == "auto":
        use = "cbc" if n_vars <= AUTO_CBC_MAX_VARS else "highs"

    start_x = None
    h_choice, h_bound = None, -np.inf
    if heuristic and n_vars:
        th = time.perf_counter()
        h_choice, h_bound = _hull_greedy(cost, nbytes, keep, min_b, rows_spec, capacity, groups, group_capacity, n_groups)
        h_obj = math.fsum(cost[rows, h_choice].tolist())
        h_gap = 0.0 if h_obj - h_bound <= 1e-12 * max(abs(h_obj), abs(h_bound)) else (h_obj - h_bound) / max(abs(h_obj), 1e-300)
        info.update(hull_seconds=round(time.perf_counter() - th, 4), hull_gap=h_gap)
        if h_gap <= rel_gap:
            return finish(h_choice, "hull", "optimal", h_bound, n_vars, info)
        start_x = (vf == h_choice[vi]).astype(np.float64)

    tighten = [0] * len(rows_spec)
    status = "unknown"
    bound_scaled = -np.inf
    for attempt in range(3):
        rhs_scaled = [(rhs - t) // gcd for (_, _, _, gcd, rhs), t in zip(rows_spec, tighten)]
        remaining = time_limit - (time.perf_counter() - t0)
        if attempt and remaining <= 0:
            break  # out of time: fall through to greedy repair
        remaining = max(remaining, 0.1)
        if any(r < 0 for r in rhs_scaled):
            break  # tightening overshot the reachable minimum: fall through to greedy repair
        if use == "highs":
            x, status, bound_scaled = _solve_highs(vi, item_pos, free_idx.size, obj, rows_spec, rhs_scaled, remaining, rel_gap,
                                                   start=start_x if attempt == 0 else None, offset=const_cost / c_scale)
        else:
            x, status, bound_scaled = _solve_cbc(vi, item_pos, free_idx.size, obj, rows_spec, rhs_scaled, remaining, rel_gap)
        if x is None and h_choice is not None:
            choice = h_choice.copy()
            status = f"{status}+hull"
            break
        if x is None:
            raise RuntimeError(f"{use} found no feasible allocation (status {status}); try a longer time_limit")
        X = np.full((free_idx.size, n_formats), -np.inf)
        X[item_pos[vi], vf] = x
        choice[free_idx] = np.argmax(X, axis=1)
        # exact check of every byte row
        sel = vf == choice[vi]
        overs = [int(db[m & sel].sum()) - rhs for (_, m, _, _, rhs) in rows_spec]
        if all(o <= 0 for o in overs):
            break
        info.setdefault("retightened", []).append([int(o) for o in overs])
        tighten = [t + max(o, 0) for t, o in zip(tighten, overs)]
    if not _fits(nbytes[rows, choice], capacity, groups, group_capacity, n_groups):
        choice = _greedy_repair(choice, cost, nbytes, keep, capacity, groups, group_capacity, n_groups)
        status += "+repaired"
    bound = bound_scaled * c_scale + const_cost if np.isfinite(bound_scaled) else -np.inf
    if h_choice is not None:
        # both bounds are valid; keep the better incumbent (the solver may stop at a worse one)
        bound = max(bound, h_bound)
        if math.fsum(cost[rows, h_choice].tolist()) < math.fsum(cost[rows, choice].tolist()):
            choice = h_choice
            info["incumbent"] = "hull"
    return finish(choice, use, status, bound, n_vars, info)


def _lower_hull(cost, nbytes, keep):
    """[N, F] bool: kept formats on each item's lower convex hull in the (bytes, cost) plane
    (collinear points stay). Pruned formats have strictly increasing bytes and strictly
    decreasing cost, so one pass per removable point suffices (F is small)."""
    hull = keep.copy()
    n, f = cost.shape
    for _ in range(f):
        key = np.where(hull, nbytes, np.iinfo(np.int64).max)
        order = np.argsort(key, axis=1, kind="stable")
        alive = np.take_along_axis(hull, order, axis=1)
        b = np.take_along_axis(nbytes, order, axis=1).astype(np.float64)
        c = np.take_along_axis(np.where(hull, cost, 0.0), order, axis=1)
        if f < 3:
            break
        trip = alive[:, :-2] & alive[:, 1:-1] & alive[:, 2:]
        lhs = (c[:, 1:-1] - c[:, :-2]) * (b[:, 2:] - b[:, 1:-1])
        rhs = (c[:, 2:] - c[:, 1:-1]) * (b[:, 1:-1] - b[:, :-2])
        drop = trip & (lhs > rhs)  # middle point above the chord of its neighbours
        if not drop.any():
            break
        rows, cols = np.nonzero(drop)
        hull[rows, order[rows, cols + 1]] = False
    return hull


def _hull_greedy(cost, nbytes, keep, min_b, rows_spec, capacity, groups, group_capacity, n_groups):
    """Greedy incumbent and exact lower bound.

    Upgrades are the steps between consecutive points of each item's lower hull (more bytes,
    less cost), ordered by cost saved per byte. Starting from the smallest format everywhere,
    an upgrade is taken when the item sits at its start point and every cap still holds.
    The bound is the LP relaxation of each binding byte row alone (the classic greedy with one
    fractional step, exact for a multiple-choice knapsack with one constraint; with per-group
    rows only, the groups separate); with several rows the largest of these relaxations is a
    valid bound.
    """
    n = cost.shape[0]
    hull = _lower_hull(cost, nbytes, keep)
    key = np.where(hull, nbytes, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    k_per = hull.sum(axis=1)
    # steps (item, j -> j+1) in hull order
    ii, jj = np.nonzero(np.arange(cost.shape[1])[None, :] < (k_per - 1)[:, None])
    f_from = order[ii, jj]
    f_to = order[ii, jj + 1]
    step_b = nbytes[ii, f_to] - nbytes[ii, f_from]  # > 0
    step_d = cost[ii, f_from] - cost[ii, f_to]  # > 0
    eff = step_d / step_b
    srt = np.lexsort((jj, ii, -eff))
    ii, jj, f_from, f_to, step_b, step_d = ii[srt], jj[srt], f_from[srt], f_to[srt], step_b[srt], step_d[srt]
    rows = np.arange(n)
    base_choice = order[:, 0]
    base = math.fsum(cost[rows, base_choice].tolist())

    # exact LP bounds, one binding row family at a time
    bounds = []
    has_global = any(name == "global" for name, *_ in rows_spec)
    group_rows = {int(name[5:]): rhs for name, _, _, _, rhs in rows_spec if name.startswith("group")}
    if has_global:
        rhs = capacity - int(min_b.sum())
        cum = np.cumsum(step_b)
        bounds.append(base - _lp_saving(step_b, step_d, cum, rhs))
    if group_rows:
        g_of = groups[ii]
        saving = 0.0
        for g, rhs in group_rows.items():
            m = g_of == g
            saving += _lp_saving(step_b[m], step_d[m], np.cumsum(step_b[m]), rhs)
        # groups without a binding row take all their upgrades
        free_m = ~np.isin(g_of, list(group_rows))
        saving += math.fsum(step_d[free_m].tolist())
        bounds.append(base - saving)
    bound = max(bounds) if bounds else base - math.fsum(step_d.tolist())

    # greedy incumbent, exact integer bookkeeping
    cur = np.zeros(n, dtype=np.int64)
    rem = capacity - int(min_b.sum()) if capacity is not None else None
    rem_g = None
    if group_capacity is not None:
        rem_g = (group_capacity - _group_sums(min_b, groups, n_groups)).tolist()
    cur_l = cur.tolist()
    g_l = groups[ii].tolist() if groups is not None else [0] * ii.size
    for i, j, b, g in zip(ii.tolist(), jj.tolist(), step_b.tolist(), g_l):
        if cur_l[i] != j:
            continue
        if rem is not None and b > rem:
            continue
        if rem_g is not None and b > rem_g[g]:
            continue
        cur_l[i] = j + 1
        if rem is not None:
            rem -= b
        if rem_g is not None:
            rem_g[g] -= b
    cur = np.asarray(cur_l, dtype=np.int64)
    return order[rows, cur], bound


def _lp_saving(step_b, step_d, cum, rhs) -> float:
    """Cost saved by the LP relaxation of one knapsack row over efficiency-sorted upgrades."""
    taken = cum <= rhs
    k = int(taken.sum())  # cum is increasing: a prefix is taken
    saving = math.fsum(step_d[:k].tolist())
    if k < step_b.size:
        before = int(cum[k - 1]) if k else 0
        saving += step_d[k] * (rhs - before) / step_b[k]
    return saving


def _fits(picked_bytes, capacity, groups, group_capacity, n_groups) -> bool:
    if capacity is not None and int(picked_bytes.sum()) > capacity:
        return False
    if group_capacity is not None and (_group_sums(picked_bytes, groups, n_groups) > group_capacity).any():
        return False
    return True


def _greedy_repair(choice, cost, nbytes, keep, capacity, groups, group_capacity, n_groups):
    """Move items to smaller formats, cheapest cost increase per byte saved first, until every cap
    holds. Only reached if solver tolerances defeat the re-solves; always terminates since the
    all-smallest choice is feasible."""
    choice = choice.copy()
    n = choice.size
    rows = np.arange(n)
    while True:
        picked = nbytes[rows, choice]
        viol_items = np.zeros(n, bool)
        if capacity is not None and int(picked.sum()) > capacity:
            viol_items[:] = True
        if group_capacity is not None:
            gb = _group_sums(picked, groups, n_groups)
            viol_items |= (gb > group_capacity)[groups]
        if not viol_items.any():
            return choice
        saved = picked[:, None] - nbytes
        ok = keep & (saved > 0) & viol_items[:, None]
        rate = np.where(ok, (cost - cost[rows, choice][:, None]) / np.where(ok, saved, 1), np.inf)
        i, f = np.unravel_index(np.argmin(rate), rate.shape)
        if not np.isfinite(rate[i, f]):  # pragma: no cover - impossible after the feasibility check
            raise RuntimeError("greedy repair could not restore feasibility")
        choice[i] = f


def _solve_highs(vi, item_pos, n_free, obj, rows_spec, rhs_scaled, time_limit, rel_gap, start=None, offset=0.0):
    """Returns (x, status, bound) with the bound in `obj` units without the offset. The offset
    (the constant cost removed from obj) is given to HiGHS so its relative gap is the gap of the
    caller's objective."""
    import highspy

    n_vars = vi.size
    n_rows = n_free + len(rows_spec)
    # triplets (row, col, value); columns ascending, rows ascending within a column
    r_parts = [item_pos[vi]]
    c_parts = [np.arange(n_vars)]
    v_parts = [np.ones(n_vars)]
    for k, (_, m, coef, _, _) in enumerate(rows_spec):
        cols = np.flatnonzero(m)
        r_parts.append(np.full(cols.size, n_free + k))
        c_parts.append(cols)
        v_parts.append(coef.astype(np.float64))
    r = np.concatenate(r_parts)
    c = np.concatenate(c_parts)
    v = np.concatenate(v_parts)
    order = np.lexsort((r, c))
    r, c, v = r[order], c[order], v[order]
    start = np.searchsorted(c, np.arange(n_vars + 1)).astype(np.int32)
    row_lower = np.concatenate([np.ones(n_free), np.full(len(rows_spec), -np.inf)])
    row_upper = np.concatenate([np.ones(n_free), np.asarray(rhs_scaled, dtype=np.float64)])

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(rel_gap))
    h.setOptionValue("mip_abs_gap", 0.0)
    h.passModel(
        int(n_vars), int(n_rows), int(v.size), 1, 1, float(offset),  # colwise, minimise
        obj.astype(np.float64), np.zeros(n_vars), np.ones(n_vars), row_lower, row_upper,
        start, r.astype(np.int32), v, np.ones(n_vars, dtype=np.int32),
    )
    if start is not None:
        h.setSolution(int(n_vars), np.arange(n_vars, dtype=np.int32), np.asarray(start, dtype=np.float64))
    h.run()
    ms = h.getModelStatus()
    info = h.getInfo()
    status = {
        highspy.HighsModelStatus.kOptimal: "optimal",
        highspy.HighsModelStatus.kTimeLimit: "time_limit",
        highspy.HighsModelStatus.kInfeasible: "infeasible",
    }.get(ms, h.modelStatusToString(ms).lower().replace(" ", "_"))
    if info.primal_solution_status != 2:  # kSolutionStatusFeasible
        return None, status, -np.inf
    x = np.asarray(h.getSolution().col_value)
    if ms == highspy.HighsModelStatus.kOptimal and info.mip_gap <= 1e-9:
        # proven optimal up to HiGHS's tolerances: report the bound as the objective itself
        # rather than a dual bound carrying ~1e-12 of floating-point noise
        return x, status, float(obj @ np.round(x))
    return x, status, float(info.mip_dual_bound) - float(offset)


_CBC_BEST_POSSIBLE = re.compile(r"best possible ([-+0-9.eE]+)")
_CBC_LOWER_BOUND = re.compile(r"^Lower bound:\s*([-+0-9.eE]+)", re.M)


def _solve_cbc(vi, item_pos, n_free, obj, rows_spec, rhs_scaled, time_limit, rel_gap):
    import pulp

    n_vars = vi.size
    prob = pulp.LpProblem("allocation", pulp.LpMinimize)
    if hasattr(prob, "add_variable"):  # PuLP >= 3.3; LpVariable(...) is deprecated there
        xs = [prob.add_variable(f"x{k}", 0, 1, cat=pulp.LpBinary) for k in range(n_vars)]
    else:  # pragma: no cover - older PuLP
        xs = [pulp.LpVariable(f"x{k}", 0, 1, cat=pulp.LpBinary) for k in range(n_vars)]
    prob += pulp.LpAffineExpression(zip(xs, obj.tolist()))
    starts = np.searchsorted(item_pos[vi], np.arange(n_free + 1))
    for j in range(n_free):
        prob += pulp.LpAffineExpression((xs[k], 1.0) for k in range(starts[j], starts[j + 1])) == 1, f"one{j}"
    for k, (name, m, coef, _, _) in enumerate(rows_spec):
        cols = np.flatnonzero(m).tolist()
        prob += pulp.LpAffineExpression(zip((xs[q] for q in cols), coef.astype(float).tolist())) <= float(rhs_scaled[k]), name
    fd, log_path = tempfile.mkstemp(suffix=".cbc.log")
    os.close(fd)
    try:
        with warnings.catch_warnings():  # PULP_CBC_CMD (the bundled CBC) is deprecated in PuLP 3.3
            warnings.simplefilter("ignore", DeprecationWarning)
            cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=float(time_limit), gapRel=float(rel_gap), gapAbs=0.0, threads=1, logPath=log_path)
        prob.solve(cmd)
        with open(log_path, errors="replace") as fh:
            log = fh.read()
    finally:
        os.unlink(log_path)
    sol = prob.sol_status
    status = {pulp.LpSolutionOptimal: "optimal", pulp.LpSolutionIntegerFeasible: "time_limit"}.get(sol, pulp.LpStatus[prob.status].lower())
    if sol not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, status, -np.inf
    x = np.array([v.varValue if v.varValue is not None else 0.0 for v in xs])
    objv = float(obj @ np.round(x))
    # CBC reports its bound only in the log (rounded to a few digits; the last one printed may be
    # older, i.e. lower, than the final one, so the gap is conservative). A completed search with
    # no gap tolerance is proven optimal.
    if sol == pulp.LpSolutionOptimal and rel_gap == 0:
        return x, status, objv
    found = _CBC_BEST_POSSIBLE.findall(log) or _CBC_LOWER_BOUND.findall(log)
    bound = float(found[-1]) if found else (objv if sol == pulp.LpSolutionOptimal else -np.inf)
    return x, status, min(bound, objv)
