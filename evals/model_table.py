"""The project's models side by side: `python -m evals.model_table [--max-tokens N] [--tasks ...] [--limit N]`.

Rows: the shipped default model, dense SmolLM2-135M-Instruct and the reference MoE built from it
(`python -m evals.models.build_reference`; rows whose model is not built are skipped with a note).
Columns: parameters, checkpoint bytes, perplexity on each held-out text (first --max-tokens tokens, windows
of 512) and lm-eval accuracy on local tasks (first --limit examples). Resumable: rows already in
evals/results/models.json are kept; writes models.json and models.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compressor.assets import DEFAULT_MODEL_DIR, REFERENCE_DROP_DIR, REFERENCE_MODEL_DIR, SMOLLM2_DIR
from compressor.io.checkpoint import tensor_nbytes
from compressor.arch.families import SUPPORTED_MODEL_TYPES
from compressor.io.models import load_model, load_tokenizer
from evals.compare import RESULTS, evaluate_model, task_accuracy

MODELS = {"default (shipped)": DEFAULT_MODEL_DIR, "SmolLM2-135M dense": SMOLLM2_DIR, "reference MoE": REFERENCE_MODEL_DIR,
          "reference MoE, drop-upcycled": REFERENCE_DROP_DIR}


def row(model_dir: Path, max_tokens: int, tasks: list[str], limit: int | None) -> dict:
    t0 = time.time()
    config = json.loads((model_dir / "config.json").read_text())
    if config["model_type"] in SUPPORTED_MODEL_TYPES:
        model = load_model(model_dir)
    else:  # the dense SmolLM2: plain transformers (the compressor itself refuses models without MoE blocks)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"architecture": config["architectures"][0], "params": params,
            "bytes": sum(tensor_nbytes(model_dir).values()), "dtype": config.get("dtype") or config.get("torch_dtype"),
            "perplexity": evaluate_model(model, tok, max_tokens, 512),
            "accuracy": task_accuracy(model, tok, tasks, limit) if tasks else {},
            "max_tokens": max_tokens, "limit": limit, "seconds": round(time.time() - t0, 1)}


def markdown(rows: dict) -> str:
    texts = sorted({t for r in rows.values() for t in r["perplexity"]})
    tasks = sorted({t for r in rows.values() for t in r["accuracy"]})
    head = ["model", "architecture", "params", "bytes"] + [f"ppl {t}" for t in texts] + [f"acc {t}" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, r["architecture"], f"{r['params'] / 1e6:.1f}M", f"{r['bytes']:,}"]
        cells += [f"{r['perplexity'][t]:.2f}" for t in texts] + [f"{r['accuracy'].get(t, float('nan')):.3f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    any_row = next(iter(rows.values()))
    lines.append(f"\nPerplexity over the first {any_row['max_tokens']} tokens of each held-out text (each model's own "
                 "tokenizer, so perplexities compare across rows only between the two SmolLM2-tokenized models), "
                 f"windows of 512. Accuracy: lm-eval `acc` on the first {any_row['limit']} examples of each local task.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
    p.add_argument("--limit", type=int, default=200)
    a = p.parse_args()
    torch.manual_seed(0)
    path = RESULTS / "models.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    tasks = [t for t in a.tasks.split(",") if t]
    for name, directory in MODELS.items():
        if name in rows:
            print(f"[resume] {name}: done")
            continue
        if not (directory / "config.json").is_file():
            print(f"skip {name}: {directory} not built (python -m evals.models.build_reference)")
            continue
        rows[name] = row(directory, a.max_tokens, tasks, a.limit)
        print(name, rows[name]["perplexity"], rows[name]["accuracy"], flush=True)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))
    if rows:
        (RESULTS / "models.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
