"""MIP backends for the allocation: HiGHS (highspy) and CBC (PuLP, the declared solver)."""

from __future__ import annotations

import os
import re
import tempfile
import warnings

import numpy as np


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
