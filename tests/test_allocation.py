"""solve_allocation against brute force, infeasibility, exact byte caps, mcmoe_cost."""

import itertools

import numpy as np
import pytest

import compressor.allocation.lp as lp_mod
from compressor.allocation.lp import Allocation, InfeasibleBudget, mcmoe_cost, prune_dominated, solve_allocation


# ----------------------------------------------------------------------------- helpers
def random_instance(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    f = int(rng.integers(1, 5))
    if rng.random() < 0.3:  # integer costs and bytes: lots of ties
        cost = rng.integers(0, 5, (n, f)).astype(float)
        nb = rng.integers(0, 6, (n, f))
    else:
        cost = rng.random((n, f)) * 10 ** rng.uniform(-6, 3)
        nb = rng.integers(1, 10**int(rng.integers(2, 10)), (n, f))
    cost[rng.random((n, f)) < 0.25] = np.inf
    cost[np.arange(n), rng.integers(0, f, n)] = rng.random(n)  # at least one allowed per item
    n_groups = int(rng.integers(1, 4))
    groups = rng.integers(0, n_groups, n)
    return rng, cost, nb.astype(np.int64), groups, n_groups


def brute_force(cost, nb, capacity, groups=None, group_capacity=None):
    """Best objective over all choices (np.inf if none is feasible)."""
    n, f = cost.shape
    combos = np.array(list(itertools.product(range(f), repeat=n)), dtype=np.int64)
    rows = np.arange(n)
    c = cost[rows, combos]  # [K, N]
    b = nb[rows, combos]
    ok = np.isfinite(c).all(axis=1)
    if capacity is not None:
        ok &= b.sum(axis=1) <= capacity
    if group_capacity is not None:
        for g, cap in enumerate(group_capacity):
            ok &= b[:, groups == g].sum(axis=1) <= cap
    if not ok.any():
        return np.inf
    return np.where(ok, np.where(np.isfinite(c), c, 0).sum(axis=1), np.inf).min()


def between(rng, lo, hi):
    return int(lo + (hi - lo) * rng.uniform(0.0, 1.05))  # sometimes above the max: non-binding


def min_max_bytes(cost, nb):
    allowed = np.isfinite(cost)
    return np.where(allowed, nb, np.iinfo(np.int64).max).min(axis=1), np.where(allowed, nb, -1).max(axis=1)


def check_against_brute_force(a, cost, nb, capacity, groups=None, group_capacity=None):
    opt = brute_force(cost, nb, capacity, groups, group_capacity)
    assert np.isfinite(opt)
    rows = np.arange(cost.shape[0])
    assert a.choice.shape == (cost.shape[0],) and a.choice.dtype.kind == "i"
    assert np.isfinite(cost[rows, a.choice]).all(), "chose a disallowed format"
    picked = nb[rows, a.choice]
    assert a.total_bytes == int(picked.sum())
    if capacity is not None:
        assert int(picked.sum()) <= capacity
    if group_capacity is not None:
        for g, cap in enumerate(group_capacity):
            assert int(picked[groups == g].sum()) <= cap
        assert a.group_bytes.tolist() == [int(picked[groups == g].sum()) for g in range(len(group_capacity))]
    assert a.objective == pytest.approx(cost[rows, a.choice].sum(), rel=1e-12, abs=1e-300)
    assert abs(a.objective - opt) <= 1e-9 * max(abs(opt), 1e-12), (a.objective, opt)
    assert a.gap == 0.0 and a.status == "optimal"


# ----------------------------------------------------------------------------- brute force
SCOPES = ["global", "groups", "both"]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("solver", ["highs", "cbc"])
@pytest.mark.parametrize("heuristic", [False, True])
@pytest.mark.parametrize("block", range(2))
def test_matches_brute_force(solver, scope, heuristic, block):
    used = {}
    for seed in range(block * 1000, block * 1000 + (40 if solver == "highs" else 15)):
        rng, cost, nb, groups, n_groups = random_instance(seed + 7919 * SCOPES.index(scope))
        lo, hi = min_max_bytes(cost, nb)
        capacity = between(rng, lo.sum(), hi.sum()) if scope in ("global", "both") else None
        group_capacity = None
        if scope in ("groups", "both"):
            group_capacity = np.array(
                [between(rng, lo[groups == g].sum(), hi[groups == g].sum()) for g in range(n_groups)], dtype=np.int64
            )
        a = solve_allocation(cost, nb, capacity, groups=groups if group_capacity is not None else None,
                             group_capacity=group_capacity, solver=solver, rel_gap=0.0, heuristic=heuristic)
        check_against_brute_force(a, cost, nb, capacity, groups, group_capacity)
        used[a.solver] = used.get(a.solver, 0) + 1
    # the requested solver really ran (the rest were settled exactly by presolve or the hull bound)
    assert used.get(solver, 0) > 0, used


def test_auto_solver_matches_brute_force():
    for seed in range(10):
        rng, cost, nb, groups, _ = random_instance(seed + 555)
        lo, hi = min_max_bytes(cost, nb)
        cap = between(rng, lo.sum(), hi.sum())
        a = solve_allocation(cost, nb, cap, solver="auto", rel_gap=0.0)
        check_against_brute_force(a, cost, nb, cap)
        assert a.solver in ("cbc", "presolve", "hull")  # tiny: CBC


def test_global_cap_beats_per_group_caps():
    """Design.md: a global budget can only do better than per-layer budgets at the same bytes."""
    rng = np.random.default_rng(3)
    n, f = 40, 4
    cost = rng.random((n, 1)) * 2.0 ** -np.arange(f)[None] * rng.lognormal(0, 0.5, (n, f))
    nb = np.tile(np.array([1600, 800, 400, 200]), (n, 1))
    groups = np.repeat(np.arange(4), 10)
    group_capacity = np.full(4, 10 * 500)
    a_g = solve_allocation(cost, nb, None, groups=groups, group_capacity=group_capacity, rel_gap=0)
    a_all = solve_allocation(cost, nb, int(group_capacity.sum()), rel_gap=0)
    assert a_all.objective <= a_g.objective + 1e-12
    assert a_all.total_bytes <= 20000 and (a_g.group_bytes <= 5000).all()


# ----------------------------------------------------------------------------- infeasibility
def test_infeasible_global_names_min_bytes():
    cost = np.array([[1.0, 2.0, np.inf], [0.5, np.inf, 3.0]])
    nb = np.array([[100, 50, 1], [80, 2, 30]])  # allowed minima: 50 and 30 -> 80 (the inf formats don't count)
    with pytest.raises(InfeasibleBudget) as exc:
        solve_allocation(cost, nb, 79)
    assert exc.value.min_bytes == 80 and exc.value.group is None
    assert isinstance(exc.value, ValueError)
    assert "80" in str(exc.value) and "79" in str(exc.value)
    a = solve_allocation(cost, nb, 80)  # exactly at the minimum: feasible
    assert a.total_bytes == 80 and a.choice.tolist() == [1, 2]


def test_infeasible_group_names_group_and_min_bytes():
    cost = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    nb = np.array([[10, 4], [10, 5], [10, 6]])
    groups = np.array([0, 1, 1])
    with pytest.raises(InfeasibleBudget) as exc:
        solve_allocation(cost, nb, None, groups=groups, group_capacity=np.array([100, 10]))
    assert exc.value.group == 1 and exc.value.min_bytes == 11 and exc.value.capacity == 10
    assert "group 1" in str(exc.value) and "11" in str(exc.value)
    # global cap fine, group 0 infeasible
    with pytest.raises(InfeasibleBudget) as exc:
        solve_allocation(cost, nb, 1000, groups=groups, group_capacity=np.array([3, 100]))
    assert exc.value.group == 0 and exc.value.min_bytes == 4
    # group caps fine, global infeasible
    with pytest.raises(InfeasibleBudget) as exc:
        solve_allocation(cost, nb, 14, groups=groups, group_capacity=np.array([100, 100]))
    assert exc.value.group is None and exc.value.min_bytes == 15


def test_infeasible_raised_before_solver(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("solver called")

    monkeypatch.setattr(lp_mod, "_solve_highs", boom)
    monkeypatch.setattr(lp_mod, "_solve_cbc", boom)
    with pytest.raises(InfeasibleBudget):
        solve_allocation(np.ones((3, 2)), np.array([[5, 9]] * 3), 14)


# ----------------------------------------------------------------------------- exactness guards
def test_large_byte_counts_exact():
    """DeepSeek-sized experts: capacity must hold to the byte."""
    rng = np.random.default_rng(0)
    n = 300
    per = np.array([88_080_384, 44_040_192, 23_396_352, 17_891_328, 12_386_304, 9_633_792])  # not all one gcd
    nb = per[None, :] + rng.integers(0, 3, (n, 6))  # odd bytes: gcd 1
    cost = rng.random((n, 1)) * 2.0 ** -np.array([16, 8, 4, 3, 2, 1.6])[None]
    cap = int(nb[:, 3].sum()) - 12345
    # near-identical expert sizes make optimality slow to prove; a short limit still must fit exactly
    a = solve_allocation(cost, nb, cap, rel_gap=1e-3, time_limit=2.0)
    assert a.total_bytes <= cap
    assert a.total_bytes == int(nb[np.arange(n), a.choice].sum())
    assert a.bound <= a.objective
    assert a.gap == pytest.approx((a.objective - a.bound) / a.objective, abs=1e-12)
    assert a.status in ("optimal", "time_limit") and (a.status == "time_limit" or a.gap <= 1e-3)


def test_over_capacity_solution_is_resolved_or_repaired(monkeypatch):
    """If the solver returns a solution a few bytes over (tolerance), the result still fits exactly."""
    real = lp_mod._solve_highs
    calls = []

    def sloppy(vi, item_pos, n_free, obj, rows_spec, rhs_scaled, *args, **kw):
        calls.append(list(rhs_scaled))
        # pretend the solver was handed a looser cap (tolerance slack) on the first two calls
        loose = [r + 3 for r in rhs_scaled] if len(calls) <= 2 else rhs_scaled
        return real(vi, item_pos, n_free, obj, rows_spec, loose, *args, **kw)

    monkeypatch.setattr(lp_mod, "_solve_highs", sloppy)
    cost = np.array([[0.0, 1.0, 5.0]] * 5) + np.arange(5)[:, None] * 1e-3
    nb = np.array([[10, 6, 1]] * 5)
    cap = 31  # best: as many 10s as fit
    a = solve_allocation(cost, nb, cap, rel_gap=0.0, heuristic=False)
    assert a.total_bytes <= cap
    assert a.total_bytes == int(nb[np.arange(5), a.choice].sum())
    assert len(calls) >= 2 and calls[1][0] < calls[0][0]  # re-solved with a tightened cap
    assert a.objective == pytest.approx(brute_force(cost, nb, cap))


def test_greedy_repair_last_resort(monkeypatch):
    """A solver that always overshoots: the greedy repair still returns a feasible choice."""
    real = lp_mod._solve_highs

    def always_loose(vi, item_pos, n_free, obj, rows_spec, rhs_scaled, *args, **kw):
        return real(vi, item_pos, n_free, obj, rows_spec, [r + 100 for r in rhs_scaled], *args, **kw)

    monkeypatch.setattr(lp_mod, "_solve_highs", always_loose)
    cost = np.array([[0.0, 1.0, 5.0]] * 5)
    nb = np.array([[10, 6, 1]] * 5)
    groups = np.array([0, 0, 1, 1, 1])
    a = solve_allocation(cost, nb, 31, groups=groups, group_capacity=np.array([12, 30]), heuristic=False)
    assert a.status.endswith("+repaired")
    assert a.total_bytes <= 31 and (a.group_bytes <= [12, 30]).all()


# ----------------------------------------------------------------------------- reductions, misc
def test_prune_dominated_hand_example():
    cost = np.array([[1.0, 2.0, 0.5, np.inf], [3.0, 3.0, 1.0, 1.0]])
    nb = np.array([[10, 20, 30, 1], [5, 5, 8, 9]])
    keep = prune_dominated(cost, nb)
    # row 0: f1 (20 B, cost 2) is dominated by f0 (10 B, cost 1); f3 not allowed
    # row 1: f0/f1 tie -> keep one; f3 (9 B, cost 1) dominated by f2 (8 B, cost 1)
    assert keep.tolist() == [[True, False, True, False], [True, False, True, False]]


def test_presolve_when_cheapest_fits():
    cost = np.array([[3.0, 1.0], [2.0, 0.5]])
    nb = np.array([[1, 10], [1, 10]])
    a = solve_allocation(cost, nb, 20)
    assert a.solver == "presolve" and a.choice.tolist() == [1, 1] and a.objective == 1.5 and a.gap == 0


def test_empty_and_single_format():
    a = solve_allocation(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), 0)
    assert a.choice.shape == (0,) and a.total_bytes == 0 and a.objective == 0
    a = solve_allocation(np.ones((4, 1)), np.full((4, 1), 7), 28)
    assert a.choice.tolist() == [0] * 4 and a.total_bytes == 28


def test_bad_inputs():
    with pytest.raises(ValueError, match="solver"):
        solve_allocation(np.ones((2, 2)), np.ones((2, 2), dtype=int), 10, solver="gurobi")
    with pytest.raises(ValueError, match="NaN"):
        solve_allocation(np.array([[np.nan, 1.0]]), np.array([[1, 2]]), 10)
    with pytest.raises(ValueError, match="no allowed format"):
        solve_allocation(np.array([[np.inf, np.inf], [1.0, 2.0]]), np.array([[1, 2], [1, 2]]), 10)
    with pytest.raises(ValueError, match="shape"):
        solve_allocation(np.ones((2, 2)), np.ones((2, 3), dtype=int), 10)
    with pytest.raises(ValueError, match="integers"):
        solve_allocation(np.ones((2, 2)), np.full((2, 2), 1.5), 10)
    with pytest.raises(ValueError, match="groups"):
        solve_allocation(np.ones((2, 2)), np.ones((2, 2), dtype=int), None, group_capacity=np.array([5]))
    with pytest.raises(ValueError, match="capacity"):
        solve_allocation(np.ones((2, 2)), np.ones((2, 2), dtype=int), None)
    with pytest.raises(ValueError, match="group_capacity has only"):
        solve_allocation(np.ones((2, 2)), np.ones((2, 2), dtype=int), None, groups=[0, 2], group_capacity=[5, 5])


def test_allocation_fields():
    rng = np.random.default_rng(1)
    cost = rng.random((30, 4))
    nb = rng.integers(1, 100, (30, 4))
    a = solve_allocation(cost, nb, int(nb.mean(axis=1).sum()), solver="highs")
    assert isinstance(a, Allocation)
    assert a.solver in ("highs", "hull") and a.seconds > 0 and 0 <= a.gap <= 1e-4 and a.status == "optimal"
    assert a.bound <= a.objective + 1e-12


# ----------------------------------------------------------------------------- MC-MoE cost
def test_mcmoe_cost_hand_example():
    phi = np.array([0.5, 0.25])
    w = np.array([4.0, 1.0])
    eps = np.array([[1.0, 2.0], [3.0, np.inf]])
    # a=1, b=1.5: 0.5 * 4**1.5 = 4 ; 0.25 * 1 = 0.25
    np.testing.assert_allclose(mcmoe_cost(phi, w, eps), [[4.0, 8.0], [0.75, np.inf]])
    # a=2, b=1: phi^2 * w * eps^2 -> 0.25*4*[1, 4] ; 0.0625*1*[9, inf]
    np.testing.assert_allclose(mcmoe_cost(phi, w, eps, a=2.0, b=1.0), [[1.0, 4.0], [0.5625, np.inf]])


def test_mcmoe_cost_zero_importance_keeps_disallowed():
    out = mcmoe_cost(np.array([0.0]), np.array([1.0]), np.array([[1.0, np.inf]]))
    assert out[0, 0] == 0.0 and np.isinf(out[0, 1])
    with pytest.raises(ValueError):
        mcmoe_cost(np.array([-1.0]), np.array([1.0]), np.array([[1.0]]))
    with pytest.raises(ValueError):
        mcmoe_cost(np.array([1.0, 2.0]), np.array([1.0]), np.array([[1.0]]))
