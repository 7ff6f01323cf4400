"""Peak memory with the model loaded vs streamed one layer at a time: of pass 1 (the budget measurement), or of
a whole `compress` (`--what compress`: uniform RTN, so pass 2 dominates).

Each variant runs in its own fresh subprocess, one after the other in the same invocation, on the same model,
calibration windows and formats, and reports its peak resident set size (VmHWM, and getrusage's ru_maxrss), its
resident set after imports and tokenization (before the model is touched), and for pass 1 the model tensors it
holds at the start of each layer's turn. The two subprocesses' results are compared (they must be the same:
measurements for pass 1, the written tensors for compress).

    python -m evals.bench_memory                 # shipped default model; writes evals/results/bench_memory.json
    python -m evals.bench_memory --what compress --model DIR   # -> evals/results/bench_memory_compress_<model>.json

Run it on models that fit in memory: the in-memory variant loads the whole model.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODES = ("in_memory", "streamed")


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_compress(mode: str, model_dir: str | None, samples: int, seq_len: int, out: Path) -> None:
    """A whole `compress` (uniform int4 RTN into a temporary directory), streamed or with the model loaded."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    from compressor import api
    from compressor.config import Recipe, apply_overrides

    if mode == "in_memory":
        api.streamed_model = lambda *a, **k: None  # compress then loads the whole model, as before streaming
    baseline = status_kib("VmRSS")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = apply_overrides(Recipe(), {"model": model_dir, "output": str(Path(tmp) / "out"), "quantization.method": "rtn",
                                            "quantization.bits": 4, "calibration.samples": samples,
                                            "calibration.seq_len": seq_len})
        written = api.compress(recipe, log=lambda *_: None)
        digest = hashlib.sha256()  # of the tensors (the files' JSON headers order their metadata at random)
        for f in sorted(written.glob("*.safetensors")):
            for name, t in sorted(load_file(f).items()):
                digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digest = digest.hexdigest()
    out.write_text(json.dumps({
        "mode": mode, "seconds": round(time.time() - t0, 2), "peak_rss_bytes": status_kib("VmHWM") * 1024,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_model_bytes": baseline * 1024, "output_sha256": digest}))


def child(what: str, mode: str, model_dir: str | None, samples: int, seq_len: int, threads: int, out: Path) -> None:
    """One variant of pass 1, as `compress --budget` runs it; its numbers as JSON, its measurements as .pt."""
    import torch

    from compressor import api
    from compressor.arch.view import find_moe_blocks
    from compressor.calibration.layerwise import in_memory
    from compressor.config import Recipe, apply_overrides
    from compressor.io.accounting import unique_state
    from compressor.io.models import load_model, load_tokenizer
    from compressor.io.streaming import StreamedModel

    torch.set_num_threads(threads)
    if what == "compress":
        return child_compress(mode, model_dir, samples, seq_len, out)
    recipe = apply_overrides(Recipe(), {"model": model_dir, "calibration.samples": samples,
                                        "calibration.seq_len": seq_len, "allocation.budget": "2.5bits",
                                        "allocation.scope": "experts"})
    path = api.model_dir_of(recipe)
    windows = api.calibration_data(recipe, load_tokenizer(path))
    baseline = status_kib("VmRSS")
    t0 = time.time()
    if mode == "streamed":
        stream = StreamedModel(path, api._load_dtype(path))
        model, resident, held = stream.model, stream.resident, stream.resident_bytes
    else:
        model, resident = load_model(path, api._load_dtype(path)), in_memory
        held = lambda: sum(t.nbytes for t in unique_state(model).values())  # noqa: E731
    held_at_layer = []

    @contextmanager
    def watched(i, layer):
        with resident(i, layer):
            held_at_layer.append(held())
            yield

    measurements, _ = api.measure(recipe, model, find_moe_blocks(model), windows, watched)
    seconds = time.time() - t0
    torch.save([(m.name, m.count, m.eps_sq, m.hess_err) for m in measurements], out.with_suffix(".pt"))
    out.write_text(json.dumps({
        "mode": mode, "seconds": round(seconds, 2),
        "peak_rss_bytes": status_kib("VmHWM") * 1024,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_model_bytes": baseline * 1024,
        "model_tensor_bytes_held_per_layer": held_at_layer,
    }))


def same_measurements(a: Path, b: Path) -> bool:
    import torch

    x, y = torch.load(a), torch.load(b)
    return len(x) == len(y) and all(
        n1 == n2 and torch.equal(c1, c2) and torch.allclose(e1, e2, rtol=1e-5, atol=1e-9)
        and torch.allclose(h1, h2, rtol=1e-5, atol=1e-9) for (n1, c1, e1, h1), (n2, c2, e2, h2) in zip(x, y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the shipped default model)")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default: the recipe's)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--what", choices=("pass1", "compress"), default="pass1")
    ap.add_argument("--out", type=Path, default=None, help="default: evals/results/bench_memory[_compress_<model>].json")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from compressor.config import Recipe

    cal = Recipe().calibration
    samples, seq_len = args.samples or cal.samples, args.seq_len or cal.seq_len
    if args.child:
        return child(args.what, args.child, args.model, samples, seq_len, args.threads, args.child_out)

    from compressor import api
    from compressor.io.checkpoint import tensor_nbytes

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "evals.bench_memory", "--what", args.what, "--child", mode, "--child-out", str(out),
                   "--samples", str(samples), "--seq-len", str(seq_len), "--threads", str(args.threads)]
            subprocess.run(cmd + (["--model", args.model] if args.model else []), check=True,
                           cwd=Path(__file__).resolve().parent.parent)
            runs[mode] = json.loads(out.read_text())
            print(f"{mode:10s} peak RSS {runs[mode]['peak_rss_bytes'] / 2**20:8.1f} MiB, before the model "
                  f"{runs[mode]['rss_before_model_bytes'] / 2**20:8.1f} MiB, {runs[mode]['seconds']} s", flush=True)
        same = (runs["in_memory"]["output_sha256"] == runs["streamed"]["output_sha256"] if args.what == "compress"
                else same_measurements(Path(tmp) / "in_memory.pt", Path(tmp) / "streamed.pt"))
    mem, st = runs["in_memory"], runs["streamed"]
    model_dir = api.model_or_default(args.model)
    out_path = args.out or RESULTS / ("bench_memory.json" if args.what == "pass1" else
                                      f"bench_memory_compress_{model_dir.name}.json")
    result = {
        "what": args.what if args.what == "pass1" else "compress (uniform int4 RTN)",
        "model": str(model_dir if args.model else "compressor/assets/default_model"),
        "checkpoint_tensor_bytes": sum(tensor_nbytes(model_dir).values()),
        "calibration": {"samples": samples, "seq_len": seq_len},
        "threads": args.threads, "python": platform.python_version(),
        "peak_rss_ratio_streamed_over_in_memory": round(st["peak_rss_bytes"] / mem["peak_rss_bytes"], 3),
        "peak_above_baseline_ratio": round((st["peak_rss_bytes"] - st["rss_before_model_bytes"])
                                           / (mem["peak_rss_bytes"] - mem["rss_before_model_bytes"]), 3),
        **({"max_model_tensor_bytes_held_ratio": round(max(st["model_tensor_bytes_held_per_layer"])
                                                       / max(mem["model_tensor_bytes_held_per_layer"]), 3)}
           if args.what == "pass1" else {}),
        "same_result": same,
        "runs": runs,
        "command": f"python -m evals.bench_memory --what {args.what}" + (f" --model {args.model}" if args.model else ""),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"peak RSS streamed / in memory: {result['peak_rss_ratio_streamed_over_in_memory']} "
          f"(above the pre-model baseline: {result['peak_above_baseline_ratio']}); same result: {same}; wrote {out_path}")


if __name__ == "__main__":
    main()
