"""One process against torchrun ranks on this machine: the same budget compress (pass 1, layer sensitivity, LP, GPTQ)
run as 1 rank x T threads, as N ranks x 1 thread, and as 1 rank x 1 thread (the reference the ranks must equal bit for
bit: BLAS sums a product's terms in an order that depends on the thread count, so outputs at different thread counts
differ in rounding, with or without ranks); wall time, CPU time, peak RSS per rank, outputs compared tensor by
tensor and plan by plan, each rank's share from report.json. Results in evals/results/bench_distributed.json.

    python -m evals.bench_distributed --model ~/.cache/moe-compressor/reference-moe --samples 16 --seq-len 256

Each run measures pass 1 afresh (--no-measurement-cache) and writes into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "evals" / "results" / "bench_distributed.json"


def compress_args(model: str, out: Path, samples: int, seq_len: int, budget: str, method: str) -> list[str]:
    return ["compress", model, "-o", str(out), "--budget", budget, "--budget-scope", "experts", "--samples",
            str(samples), "--seq-len", str(seq_len), "--method", method, "--no-measurement-cache"]


def timed(cmd: list[str], env: dict) -> dict:
    """Wall and CPU seconds (user + system, of the command and its children) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": " ".join(cmd), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def same_tensors(a: Path, b: Path) -> dict:
    from compressor.io.checkpoint import read_tensors

    ta, tb = read_tensors(a), read_tensors(b)
    differ = [k for k in ta if k not in tb or not torch.equal(ta[k], tb[k])]
    plan = lambda d: json.loads((d / "plan.json").read_text())
    return {"tensors": len(ta), "differ": len(differ), "identical": not differ and ta.keys() == tb.keys(),
            "first_differing": differ[:5], "same_plan": plan(a)["experts"] == plan(b)["experts"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path("~/.cache/moe-compressor/reference-moe").expanduser()))
    p.add_argument("--samples", type=int, default=16, help="calibration windows (>= 8 per rank: batches of 8)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--budget", default="3.25bits")
    p.add_argument("--method", default="gptq", help="pass 2's quantizer (rtn: the budget LP's plan applied without "
                                                      "GPTQ, for a shorter run)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the single process")
    p.add_argument("--runs", default="threads,serial,ranks",
                   help="which runs: threads (1 rank x --threads), serial (1 rank x 1 thread), ranks (--ranks x 1 "
                        "thread); outputs are compared between the runs made")
    args = p.parse_args(argv)
    runs = args.runs.split(",")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "budget": args.budget,
              "method": args.method, "machine": {
        "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}}
    names = {"threads": f"1 rank x {args.threads} threads", "serial": "1 rank x 1 thread",
             "ranks": f"{args.ranks} ranks x 1 thread"}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {r: Path(tmp) / r for r in runs}
        run = lambda out: [sys.executable, "cli.py", *compress_args(args.model, out, args.samples, args.seq_len,
                                                                       args.budget, args.method)]
        for r in runs:
            if r == "ranks":
                torchrun = Path(sys.executable).with_name("torchrun")
                t = timed([str(torchrun), "--nproc-per-node", str(args.ranks), *run(outs[r])[1:]],
                          {**env, "OMP_NUM_THREADS": "1"})
                report = json.loads((outs[r] / "report.json").read_text())
                t["peak_rss_mb"] = [s["peak_rss_mb"] for s in report["ranks"]]
                t["shares"] = report["ranks"]
            else:
                t = timed(run(outs[r]), {**env, "OMP_NUM_THREADS": str(args.threads if r == "threads" else 1)})
                t["peak_rss_mb"] = [json.loads((outs[r] / "report.json").read_text())["peak_rss_mb"]]
            result[names[r]] = t
            print(names[r], {k: v for k, v in t.items() if k != "shares"}, flush=True)
        for i, a in enumerate(runs):
            for b in runs[i + 1:]:
                result[f"output: {names[b]} vs {names[a]}"] = same_tensors(outs[a], outs[b])
    result["machine"]["load_average_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
