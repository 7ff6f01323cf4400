"""Quality against bytes, at equal bytes: `python -m evals.compare --suite quant|budget [--model DIR]`.

Suites
  quant   full precision, RTN and GPTQ at 8, 4, 3, 2 bits (uniform, group 128): the foundation table.
  budget  at expert budgets equal to what uniform GPTQ writes at each --points entry (2.25b = int2/g128,
          2.5b = int2/g64, 3.25b = int3/g128, 3.5b = int3/g64): uniform RTN, uniform GPTQ,
          frequency-only LP, MC-MoE per-layer LP and the global LP (all GPTQ-applied; global weights each layer's
          errors by its loss sensitivity, global-energy by the block's output energy), each global LP also with
          its error table measured with GPTQ candidates (`allocation.eps_quantizer: gptq`).

Each variant is compressed into evals/runs/<suite>/<model>/<variant>/ (kept, so an interrupted run resumes
where it stopped) and evaluated on the held-out texts; results accumulate in
evals/results/<suite>_<model>.json, with a markdown table and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compressor import api, prune
from compressor.assets import DEFAULT_MODEL_DIR, HELDOUT_TEXTS
from compressor.calibration.data import read_text, tokenize
from compressor.config import Recipe, apply_overrides
from compressor.io.checkpoint import tensor_nbytes
from compressor.io.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def quant_suite() -> dict[str, dict]:
    out = {"fp16": {}}
    for method in ("rtn", "gptq"):
        for bits in (8, 4, 3, 2):
            out[f"{method}-int{bits}"] = {"quantization.method": method, "quantization.bits": bits}
    return out


# Budget points: (tag, uniform bits, uniform group size). The tag is the uniform format's average bits per
# expert weight with its fp16 scale and zero per group: 2 + 32/128 = 2.25, 2 + 32/64 = 2.5, 3 + 32/128 = 3.25,
# 3 + 32/64 = 3.5 (plus padding where the input width is not a multiple of the group).
BUDGET_POINTS = {"2.25b": (2, 128), "2.5b": (2, 64), "3.25b": (3, 128), "3.5b": (3, 64)}
DEFAULT_POINTS = ("2.25b", "3.25b")
LP_FORMATS = ["keep", "int8", "int4", "int3", "int2", "ternary"]
ODP_TARGET = 0.2  # share of activated expert parameters online dynamic pruning skips in the "+odp" rows


def pruned(of: str) -> tuple[str, dict]:
    """A row that takes variant `of` as written, calibrates online dynamic pruning on it (calibration text)
    and evaluates it with the pruning hooks on: no new checkpoint, same bytes, fewer expert FLOPs."""
    return f"{of}+odp{round(ODP_TARGET * 100)}", {"from": of, "pruning.target": ODP_TARGET}


def budget_suite(points=DEFAULT_POINTS) -> dict[str, dict]:
    """At each point: uniform RTN and GPTQ, then the frequency-only, MC-MoE per-layer and global LPs with an
    expert budget of exactly the bytes uniform GPTQ wrote there (`"=<variant>"`, resolved when run), so every
    row of a point has the same expert bytes. The LPs choose among LP_FORMATS at group 128 (ternary: 1.625
    bits with scales, so even at the int2 size they can trade between experts), all applied with GPTQ."""
    out = dict([("fp16", {}), pruned("fp16")])
    for tag in points:
        bits, group = BUDGET_POINTS[tag]
        for method in ("rtn", "gptq"):
            out[f"{tag}-uniform-{method}"] = {"quantization.method": method, "quantization.bits": bits,
                                              "quantization.group_size": group, "quantization.dense_bits": 16}
        for objective in ("frequency", "per_layer", "global"):
            out[f"{tag}-{objective}"] = {"allocation.budget": f"={tag}-uniform-gptq", "allocation.scope": "experts",
                                         "allocation.objective": objective, "quantization.dense_bits": 16,
                                         "allocation.formats": LP_FORMATS}
        # the global LP with errors compared across layers by block output energy (blind to where they land)
        out[f"{tag}-global-energy"] = {**out[f"{tag}-global"], "allocation.layer_weights": "output_energy"}
        # both with the error table measured by GPTQ (what pass 2 applies) instead of RTN
        for name in ("global-energy", "global"):
            out[f"{tag}-{name}-gptq-eps"] = {**out[f"{tag}-{name}"], "allocation.eps_quantizer": "gptq"}
        out.update([pruned(f"{tag}-uniform-gptq"), pruned(f"{tag}-global")])
    return out


def resolve_budget(overrides: dict, results: dict) -> dict:
    """`allocation.budget: "=<variant>"` -> that variant's written expert bytes (it runs earlier in the suite)."""
    budget = overrides.get("allocation.budget")
    if not (isinstance(budget, str) and budget.startswith("=")):
        return overrides
    return {**overrides, "allocation.budget": str(results[budget[1:]]["expert_bytes"])}


SUITES = {"quant": quant_suite, "budget": budget_suite}


def expert_bytes(directory: Path) -> int:
    return sum(n for k, n in tensor_nbytes(directory).items() if ".experts." in k)


def evaluate_model(model, tok, max_tokens: int, seq_len: int) -> dict:
    out = {}
    for name, path in HELDOUT_TEXTS.items():
        ids = tokenize(tok, read_text(path))[:max_tokens]
        out[name] = round(api.perplexity(model, ids, seq_len, progress=False)["perplexity"], 4)
    return out


def task_accuracy(model, tok, tasks: list[str], limit: int | None) -> dict:
    """lm-eval accuracy (acc) per local task, on the model as the project loads it."""
    from evals.lm_eval_runner import run_tasks

    results = run_tasks(model, tok, tasks, limit=limit, batch_size=16)
    return {task: round(r.get("acc,none", float("nan")), 4) for task, r in results["results"].items()}


def row_model(model_dir: Path, runs: Path, name: str, overrides: dict, results: dict, samples: int):
    """(model, tokenizer, row) of one variant: compressed into runs/<name> unless already there; a "+odp" row
    takes an earlier row's model and calibrates online dynamic pruning on it (same bytes)."""
    row = {"settings": overrides}
    if "from" in overrides:
        src = model_dir if overrides["from"] == "fp16" else runs / overrides["from"]
        row.update(total_bytes=results[overrides["from"]]["total_bytes"], compress_seconds=0.0,
                   expert_bytes=results[overrides["from"]]["expert_bytes"])
        model, tok = load_model(src, torch.float32, dynamic_pruning=False), load_tokenizer(src)
        recipe = apply_overrides(Recipe(), {"model": str(model_dir), "calibration.samples": samples,
                                            "pruning.target": overrides["pruning.target"]})
        prune.attach(model, api.calibrate_pruning(recipe, model, api.calibration_data(recipe, tok), log=lambda *_: None))
        return model, tok, row
    if name == "fp16":
        row.update(total_bytes=sum(tensor_nbytes(model_dir).values()), expert_bytes=expert_bytes(model_dir),
                   compress_seconds=0.0)
        return load_model(model_dir), load_tokenizer(model_dir), row
    directory = runs / name
    if not (directory / "report.json").exists():
        recipe = apply_overrides(Recipe(), {"model": str(model_dir), "output": str(directory),
                                            "calibration.samples": samples, **overrides})
        api.compress(recipe, overwrite=True, log=lambda *_: None)
    report = json.loads((directory / "report.json").read_text())
    row.update(total_bytes=report["total_compressed"], expert_bytes=expert_bytes(directory),
               compress_seconds=report["seconds"])
    measured = json.loads((directory / "plan.json").read_text())["allocation"].get("measurements", "")
    if measured.startswith("pass 1 reused"):  # its compress seconds exclude pass 1
        row["pass1_reused"] = True
    return load_model(directory, torch.float32), load_tokenizer(directory), row  # every row computes in fp32


def run(suite: str, model_dir: Path, max_tokens: int, seq_len: int, samples: int, tasks: list[str],
        limit: int | None, points=DEFAULT_POINTS, only: set[str] | None = None) -> dict:
    runs = ROOT / "runs" / suite / model_dir.name
    results_path = RESULTS / f"{suite}_{model_dir.name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    variants = SUITES[suite](points) if suite == "budget" else SUITES[suite]()
    todo = [n for n in variants if (not only or n in only)
            and (n not in results or any(t not in results[n].get("accuracy", {}) for t in tasks))]
    print(f"{len(todo)} rows to run: {', '.join(todo) or 'none'}")
    started, done = time.time(), 0
    for name, overrides in variants.items():
        if only and name not in only:
            continue
        missing = [t for t in tasks if t not in results.get(name, {}).get("accuracy", {})]
        if name in results and not missing:
            print(f"[resume] {name}: done")
            continue
        if "from" in overrides and overrides["from"] not in results:
            print(f"skip {name}: needs {overrides['from']} first")
            continue
        if done:  # rows differ a lot (an LP row measures pass 1 unless it is cached): a rough estimate
            per_row = (time.time() - started) / done
            print(f"[{done + 1}/{len(todo)}] {name}: {(time.time() - started) / 60:.1f} min so far, about "
                  f"{per_row * (len(todo) - done) / 60:.0f} min left", flush=True)
        else:
            print(f"[1/{len(todo)}] {name}", flush=True)
        t0 = time.time()
        model, tok, row = row_model(model_dir, runs, name, resolve_budget(overrides, results), results, samples)
        if name in results:  # a finished row without some of the requested tasks: add their accuracy
            results[name].setdefault("accuracy", {}).update(task_accuracy(model, tok, missing, limit))
            results[name]["task_limit"] = limit
        else:
            row["perplexity"] = evaluate_model(model, tok, max_tokens, seq_len)
            if "from" in overrides:  # what pruning skipped over the perplexity evaluation
                row["activation"] = prune.activation_line(model)
            row["accuracy"] = task_accuracy(model, tok, tasks, limit) if tasks else {}
            row["task_limit"] = limit if tasks else None
            row["eval_seconds"] = round(time.time() - t0 - row["compress_seconds"], 1)
            results[name] = row
        order = list(variants)  # rows in the suite's order (point by point), whatever order they ran in
        results = dict(sorted(results.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
        RESULTS.mkdir(exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name}: {results[name]['perplexity']} {results[name]['accuracy']} ({results[name]['total_bytes']:,} bytes)")
        done += 1
    (RESULTS / f"{suite}_{model_dir.name}.md").write_text(markdown(results, max_tokens, seq_len, limit))
    plot(results, RESULTS / f"{suite}_{model_dir.name}.png")
    return results


def markdown(results: dict, max_tokens: int, seq_len: int, limit: int | None) -> str:
    texts = list(HELDOUT_TEXTS)
    tasks = sorted({t for r in results.values() for t in r.get("accuracy", {})})
    cols = ["variant", "total bytes", "expert bytes"] + [f"ppl {t}" for t in texts] + [f"acc {t}" for t in tasks]
    lines = ["| " + " | ".join(cols + ["compress s"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, r in results.items():
        cells = [name, f"{r['total_bytes']:,}", f"{r['expert_bytes']:,}"]
        cells += [f"{r['perplexity'][t]:.2f}" for t in texts]
        cells += [f"{r.get('accuracy', {}).get(t, float('nan')):.3f}" for t in tasks]
        secs = f"{r['compress_seconds']}" + (" *" if r.get("pass1_reused") else "")
        lines.append("| " + " | ".join(cells + [secs]) + " |")
    lines.append(f"\nPerplexity over the first {max_tokens} tokens of each held-out text, windows of {seq_len}."
                 + (f" Task accuracy on the first {limit} examples of each task." if tasks else "")
                 + (" *: pass 1's measurements reused from an earlier row (compressor/io/measure_cache.py), so its"
                    " compress seconds exclude them." if any(r.get("pass1_reused") for r in results.values()) else ""))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        mean = sum(r["perplexity"].values()) / len(r["perplexity"])
        ax.scatter(r["expert_bytes"] / 1e6, mean)
        ax.annotate(name, (r["expert_bytes"] / 1e6, mean), fontsize=7)
    ax.set_xlabel("expert bytes (MB)")
    ax.set_ylabel("mean held-out perplexity")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=list(SUITES), default="quant")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--tasks", default="", help="comma-separated local lm-eval tasks, e.g. piqa,arc_easy")
    p.add_argument("--limit", type=int, default=None, help="examples per task")
    p.add_argument("--points", default=",".join(DEFAULT_POINTS),
                   help=f"budget suite: comma-separated points among {', '.join(BUDGET_POINTS)}")
    p.add_argument("--variants", default="", help="run only these variants (comma-separated names); others are kept")
    a = p.parse_args()
    torch.manual_seed(0)
    run(a.suite, a.model, a.max_tokens, a.seq_len, a.samples, [t for t in a.tasks.split(",") if t], a.limit,
        tuple(t for t in a.points.split(",") if t), {v for v in a.variants.split(",") if v})


if __name__ == "__main__":
    main()
