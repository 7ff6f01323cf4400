"""Benchmark the allocation MIP on a synthetic DeepSeek-V3-shaped table.

61 layers x 256 routed experts x 7 formats (keep16, int8, int4, int3, int2 with group-128 fp16
scale+zero, ternary packed 5 trits/byte + fp16 scale per 128, drop); each expert is three
7168x2048 matrices. Costs: lognormal importance x 2^-bits x lognormal noise (keep = 0, drop =
importance). Budget: 3.0 average bits over the routed experts.

Runs HiGHS on the full instance (global cap, then MC-MoE per-layer caps), and CBC on the full
instance with a time limit plus a smaller instance where it can finish, reporting time ratios.

    python -m evals.bench_lp            # writes evals/results/bench_lp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from compressor.allocation.budget import parse_budget
from compressor.allocation.lp import solve_allocation

ROWS, COLS, N_MATS = 7168, 2048, 3
GROUP = 128
FORMATS = ["keep16", "int8", "int4", "int3", "int2", "ternary", "drop"]
BITS = np.array([16.0, 8.0, 4.0, 3.0, 2.0, 1.6, 0.0])


def expert_bytes() -> np.ndarray:
    """Exact bytes of one expert (three 7168x2048 matrices) in each format."""
    w = ROWS * COLS
    groups = w // GROUP
    per_matrix = [
        2 * w,  # keep16
        w + groups * 4,  # int8 + fp16 scale + fp16 zero per group
        w // 2 + groups * 4,  # int4
        (3 * w + 7) // 8 + groups * 4,  # int3, bit-packed
        w // 4 + groups * 4,  # int2
        -(-w // 5) + groups * 2,  # ternary: 5 trits per byte, fp16 scale per group
        0,  # drop
    ]
    return np.array(per_matrix, dtype=np.int64) * N_MATS


def make_instance(n_layers: int, n_experts: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_layers * n_experts
    importance = rng.lognormal(0.0, 1.0, n)
    noise = rng.lognormal(0.0, 0.25, (n, len(FORMATS)))
    cost = importance[:, None] * 2.0 ** -BITS[None, :] * noise
    cost[:, 0] = 0.0  # keep16 is exact
    cost[:, -1] = importance  # drop loses the whole expert
    nbytes = np.tile(expert_bytes(), (n, 1))
    groups = np.repeat(np.arange(n_layers), n_experts)
    return cost, nbytes, groups


def run(name, cost, nbytes, capacity, groups=None, group_capacity=None, **kw):
    a = solve_allocation(cost, nbytes, capacity, groups=groups, group_capacity=group_capacity, **kw)
    counts = np.bincount(a.choice, minlength=len(FORMATS))
    rec = {
        "case": name,
        "items": int(cost.shape[0]),
        "solver": a.solver,
        "seconds": round(a.seconds, 3),
        "gap": a.gap,
        "status": a.status,
        "objective": a.objective,
        "bound": a.bound,
        "total_bytes": a.total_bytes,
        "capacity": capacity if capacity is not None else int(np.sum(group_capacity)),
        "n_vars": a.n_vars,
        "formats": {f: int(c) for f, c in zip(FORMATS, counts)},
    }
    print(f"{name:28s} {a.solver:6s} {a.seconds:7.2f}s gap={a.gap:.2e} status={a.status:10s} "
          f"obj={a.objective:.6g} bytes={a.total_bytes}/{rec['capacity']}", flush=True)
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--budget", default="3bits")
    ap.add_argument("--cbc-time-limit", type=float, default=60.0)
    ap.add_argument("--cbc-small-layers", type=int, default=4)
    ap.add_argument("--skip-cbc-full", action="store_true")
    ap.add_argument("--out", default=os.path.join("evals", "results", "bench_lp.json"))
    args = ap.parse_args(argv)

    cost, nbytes, groups = make_instance(args.layers, args.experts)
    n_weights = cost.shape[0] * N_MATS * ROWS * COLS
    capacity = parse_budget(args.budget).resolve(n_weights)
    per_layer = parse_budget(args.budget).resolve(args.experts * N_MATS * ROWS * COLS)
    group_capacity = np.full(args.layers, per_layer, dtype=np.int64)
    print(f"{args.layers} layers x {args.experts} experts x {len(FORMATS)} formats; budget {args.budget} = "
          f"{capacity} bytes; expert bytes {dict(zip(FORMATS, expert_bytes().tolist()))}")

    results = []
    # default path: hull greedy + exact LP bound, HiGHS only if the bound does not settle it
    highs_full = run("full/global/default", cost, nbytes, capacity, solver="highs", rel_gap=1e-4, time_limit=60)
    results.append(highs_full)
    # HiGHS alone (no hull heuristic / warm start)
    highs_pure = run("full/global/highs-only", cost, nbytes, capacity, solver="highs", rel_gap=1e-4, time_limit=60,
                     heuristic=False)
    results.append(highs_pure)
    results.append(run("full/per-layer/default", cost, nbytes, None, groups, group_capacity, solver="highs",
                       rel_gap=1e-4, time_limit=10))
    ratios = {}
    if not args.skip_cbc_full:
        cbc_full = run("full/global/cbc-only", cost, nbytes, capacity, solver="cbc", rel_gap=1e-4,
                       time_limit=args.cbc_time_limit, heuristic=False)
        results.append(cbc_full)
        ratios["cbc_over_highs_full"] = cbc_full["seconds"] / highs_pure["seconds"]

    sl = args.cbc_small_layers * args.experts
    small_cap = parse_budget(args.budget).resolve(sl * N_MATS * ROWS * COLS)
    h_small = run(f"small{args.cbc_small_layers}/global/highs-only", cost[:sl], nbytes[:sl], small_cap,
                  solver="highs", rel_gap=1e-4, heuristic=False)
    c_small = run(f"small{args.cbc_small_layers}/global/cbc-only", cost[:sl], nbytes[:sl], small_cap, solver="cbc",
                  rel_gap=1e-4, time_limit=args.cbc_time_limit, heuristic=False)
    results += [h_small, c_small]
    ratios["cbc_over_highs_small"] = c_small["seconds"] / h_small["seconds"]
    print("time ratios:", {k: round(v, 2) for k, v in ratios.items()})

    goal = highs_full["seconds"] < 5.0 and highs_full["gap"] < 1e-3
    goal_pure = highs_pure["seconds"] < 5.0 and highs_pure["gap"] < 1e-3
    print(f"goal (full < 5 s, gap < 0.1%): default path {'met' if goal else 'NOT met'}, "
          f"HiGHS alone {'met' if goal_pure else 'NOT met'}")
    out = {
        "instance": {"layers": args.layers, "experts": args.experts, "formats": FORMATS,
                     "expert_bytes": expert_bytes().tolist(), "budget": args.budget, "capacity": capacity},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "results": results,
        "ratios": ratios,
        "goal_met": bool(goal),
        "goal_met_highs_only": bool(goal_pure),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print("wrote", args.out)
    return out


if __name__ == "__main__":
    main()
