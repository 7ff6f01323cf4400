"""Greedy pieces of the allocation: each item's lower convex hull, a hull greedy that gives an
incumbent and the exact LP-relaxation bound, and a greedy repair. numpy only."""

from __future__ import annotations

import math

import numpy as np


def _group_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.zeros(n_groups, dtype=np.int64)
    np.add.at(out, groups, values)
    return out


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
