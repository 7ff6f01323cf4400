"""The rounding of pass 2 against llama.cpp's at the same layout and bytes, end to end: fixed plans applied to the
reference MoE with a given `--method`, exported to GGUF and scored in llama.cpp (evals, not CI; resumable).

    python -m evals.ggml_fit_e2e --lp-plan /work/runs/llcmp/ours+rtn-Q2_K/plan.json --methods rtn,imatrix

Plans (--plans): `lp`, the plan the budget LP made at Q2_K's expert bytes (llamacpp_compare's ours+rtn-Q2_K; given by
--lp-plan), and `uniform-q4_0+q3_k`, llama.cpp Q2_K's own layout (gate/up q4_0, down q3_k in every layer) as a plan.
Each (plan, method) is `cli.py compress REF --plan P --method M --samples S` (imatrix and gptq calibrate on the same
S x 512 windows llamacpp_compare gives llama-imatrix), `cli.py export --format gguf`, then perplexity in llama.cpp on
the first --max-tokens tokens of each held-out text in windows of 512 (llamacpp_compare's protocol). Rows of
llama.cpp's own files (--llama NAME=FILE) are scored the same way. Results: evals/results/ggml_fit_e2e.json, keyed
"<label>|<plan>" (label: the method, or what --label says, e.g. the fit a row was made with), "|<tokens>" appended
when --max-tokens is not 2048. A compressed model or GGUF already on disk under --runs is reused, not made again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from compressor.assets import REFERENCE_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results" / "ggml_fit_e2e.json"
UNIFORM = "q4_0+q3_k"  # llama.cpp Q2_K's experts on the reference MoE: gate/up (576 wide) q4_0, down q3_k


def uniform_plan(lp: dict, fmt: str = UNIFORM) -> dict:
    plan = json.loads(json.dumps(lp))
    plan["experts"] = {k: [fmt] * len(v) for k, v in lp["experts"].items()}
    return plan


def score(gguf: Path, model: Path, max_tokens: int) -> dict:
    """Perplexity of each held-out text in llama.cpp: llamacpp_compare's protocol (windows of 512, 2 threads)."""
    from compressor.io.models import load_tokenizer
    from evals.llamacpp_compare import gguf_perplexity, heldout_ids

    return gguf_perplexity(gguf, heldout_ids(load_tokenizer(model), max_tokens), 512, threads=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL_DIR)
    p.add_argument("--lp-plan", type=Path, required=True, help="the LP plan.json (llamacpp_compare's ours+rtn-Q2_K)")
    p.add_argument("--plans", default=f"lp,uniform-{UNIFORM}")
    p.add_argument("--methods", default="rtn,imatrix")
    p.add_argument("--label", default=None, help="key prefix instead of the method (one method only)")
    p.add_argument("--llama", action="append", default=[], metavar="NAME=FILE", help="a llama.cpp GGUF to score too")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--runs", type=Path, default=Path("/work/runs/fit"))
    a = p.parse_args()
    a.runs.mkdir(parents=True, exist_ok=True)
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}

    def save(key: str, row: dict) -> None:
        res[key] = row
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(RESULTS)
        print(key, row, flush=True)

    tokens = "" if a.max_tokens == 2048 else f"|{a.max_tokens}"  # rows scored on more tokens than the first ones
    for spec in a.llama:
        name, _, file = spec.partition("=")
        if f"llama.cpp {name}{tokens}" not in res:
            save(f"llama.cpp {name}{tokens}", {**score(Path(file), a.model, a.max_tokens), "file": file})
    lp = json.loads(a.lp_plan.read_text())
    plans = {"lp": lp, f"uniform-{UNIFORM}": uniform_plan(lp)}
    for plan_name in a.plans.split(","):
        for method in a.methods.split(","):
            key = f"{a.label or method}|{plan_name}{tokens}"
            if key in res:
                continue
            pf = a.runs / f"plan-{plan_name}.json"
            pf.write_text(json.dumps(plans[plan_name], indent=1))
            out, gguf = a.runs / f"{method}-{plan_name}", a.runs / f"{method}-{plan_name}.gguf"
            cmd = [sys.executable, "cli.py", "compress", str(a.model), "--plan", str(pf), "--method", method,
                   "--samples", str(a.samples), "-o", str(out), "--overwrite"]
            t0 = time.time()
            if not (out / "report.json").exists():
                subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            seconds = round(time.time() - t0, 1)
            if not gguf.exists():
                subprocess.run([sys.executable, "cli.py", "export", str(out), "--format", "gguf", "--output",
                                str(gguf)], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            report = json.loads((out / "report.json").read_text())
            save(key, {**score(gguf, a.model, a.max_tokens), "command": " ".join(cmd[1:]),
                       "compress_seconds": report.get("seconds"), "wall_seconds": seconds, "loadavg": os.getloadavg()})


if __name__ == "__main__":
    main()
