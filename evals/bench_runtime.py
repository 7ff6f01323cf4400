"""The packed runtime against the original model: decode and prefill speed, memory (issue 19's goals).

For each model (the shipped default model; the reference MoE when built) and each compressed variant (uniform int4
RTN g128; a 2.5-bit budget plan; uniform int4 with online dynamic pruning at 30%), `compressor.runtime.bench` runs
the compressed model and its original (float32 and its 16-bit dtype) in fresh processes, in turn, `--repeats` times,
in two settings: decode (batch 1, prompt 128, 64 greedy steps on the KV cache) and prefill (batch 8 x 256, 2 steps).
The pruned variant is also run with pruning off, which is the "pruning at 30% measurably faster" comparison.

    python -m evals.bench_runtime --models default --threads 2        # minutes
    python -m evals.bench_runtime --models reference --threads 2      # about an hour (compresses what is missing)

Compressed variants are written under evals/runs/runtime/ (reused when present: `--variant NAME=DIR` points a
variant at an existing directory); results go to evals/results/bench_runtime_<model>.json and .md. The machine's
load average is recorded with every run: ratios measured in the same run are what compare.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from compressor import api
from compressor.assets import DEFAULT_MODEL_DIR, REFERENCE_MODEL_DIR
from compressor.config import Recipe, apply_overrides
from compressor.io.models import read_config
from compressor.runtime.bench import MIB, bench, format_report

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).parent / "runs" / "runtime"
MODELS = {"default": DEFAULT_MODEL_DIR, "reference": REFERENCE_MODEL_DIR}
SETTINGS = {"decode": dict(prompt_len=128, gen_len=64, batch=1), "prefill": dict(prompt_len=256, gen_len=2, batch=8)}


def variants(model_dir: Path) -> dict[str, dict]:
    """Recipe overrides of each compressed variant (unquantized tensors in the original's own 16-bit dtype)."""
    own = str(read_config(model_dir).get("dtype") or "float16")
    base = {"model": str(model_dir), "dtype": own if own in ("float16", "bfloat16") else "float16",
            "quantization.group_size": 128}
    return {
        "int4": {**base, "quantization.method": "rtn", "quantization.bits": 4},
        "2.5b": {**base, "quantization.method": "rtn", "allocation.budget": "2.5bits", "allocation.scope": "experts",
                 "calibration.samples": 32},
        "int4+odp30": {**base, "quantization.method": "rtn", "quantization.bits": 4, "pruning.target": 0.3},
    }


def compressed(name: str, model: str, overrides: dict, given: dict[str, str]) -> Path:
    if name in given:
        return Path(given[name])
    out = RUNS / f"{model}-{name}"
    if not (out / "config.json").is_file():
        api.compress(apply_overrides(Recipe(), {**overrides, "output": str(out)}), overwrite=True)
    return out


def table(results: dict) -> str:
    lines = ["| variant | setting | compressed tok/s | original fp32 tok/s | original 16-bit tok/s | ratio | ratio per "
             "CPU-s | resident MiB | checkpoint MiB | load avg |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        for setting, r in runs.items():
            metric = "decode_tok_s" if setting.startswith("decode") else "prefill_tok_s"
            rows = r["rows"]
            cells = []
            for label in ("compressed", "original float32", next((k for k in rows if k.startswith("original ")
                                                                  and k != "original float32"), None)):
                v = rows.get(label, {}).get(metric) if label else None
                cells.append(f"{v['median']:,.1f} [{v['min']:,.1f}-{v['max']:,.1f}]" if v else "-")
            ratio, cpu = r.get(f"{metric}_ratio"), r.get(f"{metric.replace('_s', '_cpu_s')}_ratio")
            c = rows["compressed"]
            lines.append(f"| {name} | {setting} | {' | '.join(cells)} | {f'{ratio:.2f}x' if ratio else '-'} | "
                         f"{f'{cpu:.2f}x' if cpu else '-'} | "
                         f"{c['resident']['median'] / MIB:,.0f} | {c['checkpoint_bytes'] / MIB:,.1f} | "
                         f"{r['load'][0]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default", help="comma-separated: default, reference")
    ap.add_argument("--variants", default="int4,2.5b,int4+odp30")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR", help="use an existing directory")
    ap.add_argument("--settings", default="decode,prefill")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-float32-original", dest="float32_original", action="store_false",
                    help="compare with the original's 16-bit form only (its float32 loading needs twice the memory)")
    a = ap.parse_args()
    given = dict(v.split("=", 1) for v in a.variant)
    for model in a.models.split(","):
        model_dir = MODELS[model]
        results: dict[str, dict] = {}
        out = RESULTS / f"bench_runtime_{model}.json"
        for name in a.variants.split(","):
            path = compressed(name, model, variants(model_dir)[name], given)
            for setting in a.settings.split(","):
                runs = [(setting, True)] + ([(f"{setting}, pruning off", False)] if "odp" in name else [])
                for label, pruning in runs:
                    print(f"== {model} {name} {label}", flush=True)
                    r = bench(path, model_dir, threads=a.threads, repeats=a.repeats, dynamic_pruning=pruning,
                              float32_original=a.float32_original, **SETTINGS[setting])
                    print(format_report(r), flush=True)
                    results.setdefault(name, {})[label] = r
                    out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(table(results) + "\n")
        print(table(results))


if __name__ == "__main__":
    main()
