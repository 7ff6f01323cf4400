"""`cli.py bench`: prefill and decode speed and memory of a compressed model against its original, in one run.

Every measurement is a fresh process (`python -m compressor.runtime.bench --one ARGS`): it imports torch, notes its
RSS after importing the model's code (the baseline), loads the model, notes the RSS again, warms up, times one prefill of `batch x prompt_len` random
tokens (seeded, the same for every model) and `gen_len` greedy decode steps on the KV cache, and reports its peak
RSS. The variants are the compressed model (unquantized tensors in its checkpoint's dtype) and its original, both in
float32 and in its 16-bit checkpoint dtype; rounds run the variants in turn, `repeats` times, and each number is the
median over rounds with its range. Ratios are taken against the faster form of the original, per metric.

resident = loaded RSS - baseline RSS, every page of every tensor read first (the loader maps the checkpoint file,
whose pages arrive when first read): the memory the loaded model holds (weights, kernel layouts, the allocator's
slack), against the checkpoint's tensor bytes.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 2 ** 20
# tokens per second of wall time, and per second of the process's CPU time (all its threads): the second does not
# count time the process waited for a core, so it is steadier on a shared machine (and counts spinning threads)
METRICS = ("decode_tok_s", "prefill_tok_s", "decode_tok_cpu_s", "prefill_tok_cpu_s")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _import_model_code(model_dir: str) -> None:
    """Import everything loading will (transformers, the model's modeling module) before the baseline RSS, so that
    `resident` counts the model and not the code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..io import checkpoint  # noqa: F401 - the loader's own code
    from .kernels import native

    native.library()  # loads (or builds) the compiled kernels
    config = AutoConfig.from_pretrained(model_dir)
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        pass  # not a causal LM of the auto mapping (an up-cycled vision model): its code loads with it


def _touch(model) -> None:
    """Read one byte of every page of every tensor: the loader maps the checkpoint's file, whose pages arrive as they
    are first read, and `resident` is meant to count the whole model."""
    import torch

    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        if t.numel() and t.device.type == "cpu":
            t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def measure(model_dir: str, dtype: str | None, prompt_len: int, gen_len: int, batch: int, threads: int,
            dynamic_pruning: bool = True, seed: int = 0) -> dict:
    """One measurement in this process (see the module docstring)."""
    import torch

    torch.set_num_threads(threads)
    from ..io.models import load_model
    from .kernels import report

    _import_model_code(model_dir)
    base = _rss()
    t0 = time.perf_counter()
    model = load_model(model_dir, None if dtype is None else getattr(torch, dtype), dynamic_pruning=dynamic_pruning)
    load_s = time.perf_counter() - t0
    _touch(model)
    loaded = _rss()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)

    @torch.inference_mode()
    def run(prompt: torch.Tensor, steps: int) -> tuple[float, float, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=prompt, use_cache=True)
        t1, c1 = time.perf_counter(), time.process_time()
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return t1 - t0, time.perf_counter() - t1, c1 - c0, time.process_time() - c1

    run(ids[:, : min(16, prompt_len)], 2)  # warm-up: first calls allocate workspaces and caches
    prefill_s, decode_s, prefill_cpu, decode_cpu = run(ids, gen_len)
    return {"prefill_tok_s": batch * prompt_len / prefill_s, "decode_tok_s": batch * gen_len / max(decode_s, 1e-9),
            "prefill_tok_cpu_s": batch * prompt_len / max(prefill_cpu, 1e-9),
            "decode_tok_cpu_s": batch * gen_len / max(decode_cpu, 1e-9),
            "baseline_rss": base, "loaded_rss": loaded, "peak_rss": _peak_rss(), "resident": loaded - base,
            "load_s": load_s, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "kernels": report(model)}


def measure_fresh(model_dir: str | Path, dtype: str | None, prompt_len: int, gen_len: int, batch: int, threads: int,
                  dynamic_pruning: bool = True) -> dict:
    """`measure` in a new Python process (nothing cached from an earlier model, its own peak RSS)."""
    import compressor

    args = dict(model_dir=str(model_dir), dtype=dtype, prompt_len=prompt_len, gen_len=gen_len, batch=batch,
                threads=threads, dynamic_pruning=dynamic_pruning)
    root = str(Path(compressor.__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "compressor.runtime.bench", "--one", json.dumps(args)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench of {model_dir} ({dtype or 'its dtype'}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def original_of(model_dir: Path) -> Path | None:
    """The model a compressed one came from: its recipe.yaml's `model:` (null: the shipped default model)."""
    import yaml

    from ..assets import DEFAULT_MODEL_DIR

    recipe = model_dir / "recipe.yaml"
    if not recipe.is_file():
        return None
    name = (yaml.safe_load(recipe.read_text()) or {}).get("model")
    return Path(name).expanduser() if name else DEFAULT_MODEL_DIR


def _variants(model_dir: Path, original: Path | None, float32: bool = True) -> list[tuple[str, Path, str | None]]:
    from ..io.models import read_config

    out = [("compressed", model_dir, None)]
    if original is not None:
        if float32:
            out.append(("original float32", original, "float32"))
        own = str(read_config(original).get("dtype") or read_config(original).get("torch_dtype") or "float32")
        if own in ("float16", "bfloat16"):
            out.append((f"original {own}", original, own))
    return out


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def bench(model_dir: str | Path, original: str | Path | None = None, prompt_len: int = 128, gen_len: int = 64,
          batch: int = 1, threads: int | None = None, repeats: int = 3, dynamic_pruning: bool = True,
          float32_original: bool = True, log=print) -> dict:
    """See the module docstring; `float32_original` False leaves the original's float32 form out (its loading peaks
    at about twice its float32 size, which a machine short of memory may not have)."""
    from ..io.checkpoint import tensor_nbytes

    model_dir = Path(model_dir).expanduser()
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    orig = Path(original).expanduser() if original else original_of(model_dir)
    missing = None
    if orig is not None and not (orig / "config.json").is_file():
        missing, orig = str(orig), None
    variants = _variants(model_dir, orig, float32_original)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    for r in range(repeats):
        for label, path, dtype in variants:
            m = measure_fresh(path, dtype, prompt_len, gen_len, batch, threads, dynamic_pruning)
            runs[label].append(m)
            log(f"round {r + 1}/{repeats} {label}: prefill {m['prefill_tok_s']:,.1f} tok/s, decode "
                f"{m['decode_tok_s']:,.2f} tok/s, resident {m['resident'] / MIB:,.0f} MiB, peak RSS "
                f"{m['peak_rss'] / MIB:,.0f} MiB")
    rows = {}
    for label, path, dtype in variants:
        ms = runs[label]
        rows[label] = {"model": str(path), "dtype": ms[0]["dtype"],
                       "checkpoint_bytes": sum(tensor_nbytes(path).values()),
                       **{k: _summary([m[k] for m in ms]) for k in METRICS + ("resident", "peak_rss", "baseline_rss")},
                       "kernels": ms[0]["kernels"]}
    report = {"settings": {"prompt_len": prompt_len, "gen_len": gen_len, "batch": batch, "threads": threads,
                           "repeats": repeats, "dynamic_pruning": dynamic_pruning,
                           "float32_original": float32_original},
              "load": os.getloadavg(), "rows": rows, "original_missing": missing}
    originals = [v for k, v in rows.items() if k.startswith("original")]
    if originals:
        for metric in METRICS:
            best = max(originals, key=lambda v: v[metric]["median"])
            report[f"{metric}_ratio"] = rows["compressed"][metric]["median"] / best[metric]["median"]
    return report


def format_report(report: dict) -> str:
    s = report["settings"]
    lines = [f"batch {s['batch']} x prompt {s['prompt_len']}, {s['gen_len']} decode steps, {s['threads']} threads, "
             f"median of {s['repeats']} fresh processes [min-max]; load average {report['load'][0]:.1f}",
             f"{'model':<20} {'dtype':<9} {'prefill tok/s':>24} {'decode tok/s':>22} {'resident MiB':>13} "
             f"{'peak RSS MiB':>13} {'checkpoint MiB':>15}"]
    for label, r in report["rows"].items():
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        lines.append(f"{label:<20} {r['dtype']:<9} {p['median']:>9,.1f} [{p['min']:,.0f}-{p['max']:,.0f}]"
                     f"{'':>2} {d['median']:>8,.2f} [{d['min']:,.1f}-{d['max']:,.1f}] "
                     f"{r['resident']['median'] / MIB:>13,.0f} {r['peak_rss']['median'] / MIB:>13,.0f} "
                     f"{r['checkpoint_bytes'] / MIB:>15,.1f}")
    k = report["rows"]["compressed"]["kernels"]
    lines.append(f"kernels: {k['paths']} (compiled: {k['native']}); kernel layouts beyond the checkpoint "
                 f"{k['extra_bytes'] / MIB:,.1f} MiB, workspace {k['workspace_bytes'] / MIB:,.1f} MiB")
    if "decode_tok_cpu_s_ratio" in report:
        lines.append(f"per CPU-second (steadier under load): decode {report['decode_tok_cpu_s_ratio']:.2f}x, prefill "
                     f"{report['prefill_tok_cpu_s_ratio']:.2f}x of the original")
    c = report["rows"]["compressed"]
    memory = f"resident {c['resident']['median'] / MIB:,.0f} MiB for {c['checkpoint_bytes'] / MIB:,.0f} MiB of checkpoint"
    if "decode_tok_s_ratio" in report:
        lines.append(f"bench: decode {report['decode_tok_s_ratio']:.2f}x, prefill {report['prefill_tok_s_ratio']:.2f}x "
                     f"of the original; {memory}")
    else:
        why = f"original {report['original_missing']} not found" if report["original_missing"] else "no original known"
        lines.append(f"bench: decode {c['decode_tok_s']['median']:,.2f} tok/s, prefill "
                     f"{c['prefill_tok_s']['median']:,.1f} tok/s ({why}, benched alone); {memory}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(**json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m compressor.runtime.bench --one JSON (cli.py bench is the command)")
