"""How well each ggml type's block scales are fitted: this project's scale search against the min-max grid and
against llama-quantize's own fit of the same tensors (no importance matrix), on the reference MoE's routed experts.
Weight error only (relative squared error ||W_hat - W||^2 / ||W||^2), data-free on both sides: this is RTN's fit;
GPTQ fits with the same search, weighted by its sweep's column importance.

    LLAMA=.../llama.cpp/build/bin; for t in q2_k q3_k q4_k q6_k; do LD_LIBRARY_PATH=$LLAMA $LLAMA/llama-quantize \\
        --tensor-type ffn_down_exps=$t --tensor-type ffn_gate_exps=q4_0 --tensor-type ffn_up_exps=q4_0 \\
        --tensor-type attn=f16 --token-embedding-type f16 --output-tensor-type f16 ref-f16.gguf ref-$t.gguf Q4_0 2; done
    python -m evals.ggml_fit --f16 ref-f16.gguf --quantized ref-q2_k.gguf ref-q3_k.gguf ref-q4_k.gguf ref-q6_k.gguf

Each quantized file's down experts are in the type named by its file, its gate/up experts in q4_0 (576-wide rows:
the 32-weight types only). Results: evals/results/ggml_fit.json.
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
import json
import re
from pathlib import Path

import numpy as np
import torch

from compressor.quantize import ggml, scale_search

RESULTS = Path(__file__).resolve().parent / "results" / "ggml_fit.json"


def tensors(path: Path, names: set[str]) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (ggml type name, float32 values as llama.cpp dequantizes them)."""
    import gguf

    return {t.name: (t.tensor_type.name.lower(), gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            for t in gguf.GGUFReader(str(path)).tensors if t.name in names}


def ours(kind: str, W: torch.Tensor, search: bool) -> torch.Tensor:
    t = ggml.GGML_TYPES[kind]
    with (scale_search.min_max() if not search else nullcontext()):
        h = ggml.fit_matrix(t, W)
    return ggml.dequantize_matrix(t, ggml.quantize_matrix(t, W, h), h)


def rel(W_hat: torch.Tensor, W: torch.Tensor) -> float:
    return float((W_hat - W).pow(2).sum() / W.pow(2).sum())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--f16", type=Path, required=True)
    p.add_argument("--quantized", type=Path, nargs="+", required=True)
    p.add_argument("--layers", default="0,7,14,21,29")
    a = p.parse_args(argv)
    layers = [int(x) for x in a.layers.split(",")]
    names = {f"blk.{i}.ffn_{p}_exps.weight" for i in layers for p in ("down", "gate")}
    source = tensors(a.f16, names)
    rows: dict[str, dict] = {}
    for n, path in enumerate(a.quantized):
        for name, (kind, values) in sorted(tensors(path, names).items()):
            proj = re.search(r"ffn_(\w+)_exps", name)[1]
            if proj == "gate" and n > 0:
                continue  # every file holds the same q4_0 gate tensors: the first file's
            W = torch.from_numpy(source[name][1])
            r = rows.setdefault(f"{kind} ({proj})", {"llama.cpp": [], "ours, search": [], "ours, min-max": []})
            r["llama.cpp"].append(rel(torch.from_numpy(values), W))
            r["ours, search"].append(rel(ours(kind, W, True), W))
            r["ours, min-max"].append(rel(ours(kind, W, False), W))
            print(f"{path.name} {name} {kind}: llama.cpp {r['llama.cpp'][-1]:.5f}, search {r['ours, search'][-1]:.5f}"
                  f", min-max {r['ours, min-max'][-1]:.5f}", flush=True)
    table = {k: {m: float(np.mean(v)) for m, v in r.items()} for k, r in rows.items()}
    out = {"layers": layers, "metric": "mean over layers of ||W_hat - W||^2 / ||W||^2 (all experts of the tensor)",
           "rows": table}
    RESULTS.write_text(json.dumps(out, indent=1))
    for k, r in table.items():
        print(f"{k:12s} llama.cpp {r['llama.cpp']:.5f}  ours search {r['ours, search']:.5f}  "
              f"ours min-max {r['ours, min-max']:.5f}")
    return out


if __name__ == "__main__":
    main()
