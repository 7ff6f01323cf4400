"""Each format's matrix product in the packed runtime against the 16-bit matrix's own, at the reference MoE's expert
shapes: what a format costs at decode (one row of x: the compiled GEMV on the packed bytes) and at prefill (64 rows:
dequantization into the workspace, then the library GEMM).

    python -m evals.bench_kernels [--threads 1] [--repeats 7]

For every (shape, rows) the baseline, `F.linear` on the bfloat16 weight (what the original model runs), and every
format are timed in turn, round after round, so a change in the machine's load reaches all of them alike; the
median of the rounds is reported with its ratio to the baseline of the same rounds. Results:
evals/results/bench_kernels.{json,md}, with the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compressor.quantize import QuantSpec, pack, quantize_rtn
from compressor.quantize.formats import bits_per_weight, packable
from compressor.runtime import kernels
from evals.machine import load_average

RESULTS = Path(__file__).parent / "results" / "bench_kernels"
SHAPES = {"gate_up": (3072, 576), "down": (576, 1536)}  # the reference MoE's expert matrices [out, in]
FORMATS = ("int8", "int6", "int5", "int4", "int3", "int2", "ternary", "q8_0", "q6_k", "q5_0", "q4_0", "q4_k",
           "q3_k", "q2_k")


def timed(fn, x: torch.Tensor, calls: int) -> float:
    """Seconds per call, over `calls` calls after one warm-up."""
    fn(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) / calls


def bench_shape(out_f: int, in_f: int, rows: int, repeats: int, formats) -> dict:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    x = torch.randn(rows, in_f, generator=g).to(torch.bfloat16)
    w16 = W.to(torch.bfloat16)
    fns = {"bf16": lambda v: F.linear(v, w16)}
    meta = {"bf16": {"path": "torch", "bits_per_weight": 16.0}}
    for fmt in formats:
        spec = QuantSpec(fmt, 128)
        if not packable(spec, in_f):
            continue
        k = kernels.kernel_for(pack(quantize_rtn(W, spec)), spec, out_f, in_f)
        fns[fmt] = k
        meta[fmt] = {"path": k.path, "bits_per_weight": round(bits_per_weight(spec, out_f, in_f), 4)}
    calls = 50 if rows == 1 else 5
    times: dict[str, list[float]] = {n: [] for n in fns}
    ratios: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        now = {n: timed(fn, x, calls) for n, fn in fns.items()}
        for n, t in now.items():
            times[n].append(t)
            ratios[n].append(t / now["bf16"])
    return {n: {**meta[n], "us": round(statistics.median(times[n]) * 1e6, 1),
                "vs_bf16": round(statistics.median(ratios[n]), 3)} for n in fns}


def markdown(res: dict) -> str:
    lines = [f"Per-call time of one expert matrix (median of {res['repeats']} interleaved rounds, {res['threads']} "
             f"thread(s), load {res['load_before']} -> {res['load_after']}; ratio to the bfloat16 matrix's "
             "F.linear in the same rounds).\n",
             "| matrix [out, in] | rows of x | format | bits/weight | path | us | vs bf16 |", "|---|---:|---|---:|---|---:|---:|"]
    for key, r in res["runs"].items():
        name, rows = key.rsplit("|", 1)
        for fmt, v in r.items():
            lines.append(f"| {name} {list(SHAPES[name])} | {rows} | {fmt} | {v['bits_per_weight']} | {v['path']} | "
                         f"{v['us']} | {v['vs_bf16']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64])
    p.add_argument("--formats", type=lambda s: tuple(s.split(",")), default=FORMATS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    res = {"threads": a.threads, "repeats": a.repeats, "load_before": load_average(),
           "kernels": kernels.native.unavailable_reason() or "compiled", "runs": {}}
    for name, (o, i) in SHAPES.items():
        for rows in a.rows:
            res["runs"][f"{name}|{rows}"] = bench_shape(o, i, rows, a.repeats, a.formats)
            print(name, rows, {f: v["vs_bf16"] for f, v in res["runs"][f"{name}|{rows}"].items()}, flush=True)
    res["load_after"] = load_average()
    RESULTS.with_suffix(".json").write_text(json.dumps(res, indent=1))
    RESULTS.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
