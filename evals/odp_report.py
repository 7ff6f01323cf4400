"""The markdown summary of an online-dynamic-pruning campaign (evals/odp_reference.py's JSON): the curve per model
with the change of mean perplexity against the unpruned model and the reduction measured on the held-out texts,
task accuracy with lm-eval's standard error and the paired difference to the unpruned model on the same examples,
wall time, ablations."""

from __future__ import annotations

import math
from pathlib import Path


def paired(base: str, other: str) -> tuple[float, float]:
    """Mean and standard error of the per-example difference (other - base) of two 0/1 outcome strings."""
    d = [int(b) - int(a) for a, b in zip(base, other)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _split(k: str) -> tuple[str, str, float]:
    model, method, target = k.split("|")
    return model, method, float(target)


def curve_table(data: dict) -> list[str]:
    points = data["points"]
    texts = data["settings"]["texts"]
    tasks = sorted({t for p in points.values() for t in p.get("tasks", {})})
    head = (["model", "rule", "target", "measured reduction"] + [f"ppl {t}" for t in texts] + ["mean", "vs unpruned"]
            + tasks)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    models = list(dict.fromkeys(_split(k)[0] for k in points))
    rank = {"none": 0, "calibrated": 1, "fixed-beta": 2, "random": 3}

    def order(k: str):
        model, method, target = _split(k)
        return models.index(model), rank.get(method, 4), method, target

    for k in sorted(points, key=order):
        p = points[k]
        model, method, target = _split(k)
        base = points.get(f"{model}|none|0.00")
        change = f"{p['mean'] / base['mean'] - 1:+.2%}" if base else ""
        cells = [model, method, f"{target:.0%}", f"{p['reduction']:.1%}"]
        cells += [f"{p['ppl'][t]:.2f}" for t in texts] + [f"{p['mean']:.2f}", change]
        for t in tasks:
            r = p.get("tasks", {}).get(t)
            if r is None:
                cells.append("")
                continue
            cell = f"{r['acc']:.3f} ± {r['stderr']:.3f}"
            b = (base or {}).get("tasks", {}).get(t)
            if b is not None and p is not base and len(b["correct"]) == len(r["correct"]):
                m, se = paired(b["correct"], r["correct"])
                cell += f" (paired {m:+.3f} ± {se:.3f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def walltime_table(data: dict) -> list[str]:
    lines = ["| model | configuration | prefill s (wall) | prefill s (CPU) | decode ms/token (wall) | "
             "decode ms/token (CPU) | vs unpruned (prefill CPU, decode CPU) | reduction while decoding |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, w in data["walltime"].items():
        base = w["configs"]["unpruned"]
        for name, c in w["configs"].items():
            ratio = (f"{c['prefill_cpu'] / base['prefill_cpu']:.3f}, {c['decode_cpu'] / base['decode_cpu']:.3f}"
                     if name != "unpruned" else "1, 1")
            lines.append(f"| {model} | {name} | {c['prefill_wall']:.3f} | {c['prefill_cpu']:.3f} | "
                         f"{1000 * c['decode_wall']:.1f} | {1000 * c['decode_cpu']:.1f} | {ratio} | "
                         f"{c['decode_reduction']:.1%} |")
    return lines


def write_report(data: dict, path: Path) -> None:
    s = data["settings"]
    out = [f"# Online dynamic pruning on {Path(s['model']).name}", "",
           f"Perplexity over the first {s['max_tokens']} tokens of each held-out text, windows of {s['seq_len']}; "
           f"rules calibrated on {s['calibration_samples']} calibration windows; measured reduction = activated "
           "routed-expert parameters removed on the held-out texts. Tasks: lm-eval acc ± its standard error; in "
           "brackets the paired difference to the unpruned model on the same examples ± its standard error.", ""]
    if data["models"]:
        out += ["| compressed model | expert bytes | budget | total bytes | compress s |", "|---|---:|---:|---:|---:|"]
        out += [f"| {n} | {m['expert_bytes']:,} | {m['budget_bytes']:,} | {m['total_bytes']:,} | {m['compress_seconds']} |"
                for n, m in data["models"].items()]
        out.append("")
    if data["points"]:
        out += curve_table(data) + [""]
    if data["walltime"]:
        w = next(iter(data["walltime"].values()))
        out += [f"Wall time, one thread, batch 1: prefill of {w['prefill_len']} tokens; decode: {w['decode_steps']} "
                f"steps after a {w['context']}-token prompt (teacher-forced), medians of {w['reps']} interleaved "
                "repetitions. The 16-bit model: transformers' experts module unpruned, our skipping loop over the same "
                "weights pruned; compressed models: the packed runtime, pruned slots never computed.", ""]
        out += walltime_table(data) + [""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(out))
    tmp.replace(path)
