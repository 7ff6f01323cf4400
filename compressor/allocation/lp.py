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
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .heuristics import _fits, _greedy_repair, _group_sums, _hull_greedy
from .solvers import _solve_cbc, _solve_highs

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


class InfeasibleBudget(UserError, ValueError):
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
