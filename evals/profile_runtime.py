"""Where a decode step (or a prefill) of a loaded model spends its time: torch.profiler over the bench's own loop.

    python -m evals.profile_runtime MODEL_DIR [--dtype float32] [--prompt-len 128] [--gen-len 32] [--batch 1]

The model's modules are timed by kind (experts, router, attention, the model's own linear layers, norms) with
`record_function` around their forwards; the compiled kernels are called through ctypes and so are no aten op of
their own: their time is inside the module that calls them. Prints each kind's share of the profiled wall time (the
decode loop, or the prefill alone with --gen-len 0), then the aten operators by self CPU time. The kinds nest (a
packed experts module's products are within "experts"; a compressed model's attention projections are within
"attention"), so shares do not add up to 100%; "python and the rest" is the wall time the top-level model forward
spends outside every named kind.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from compressor.io.models import load_model

KINDS = {"experts": ("Experts",), "router": ("Router",), "attention": ("Attention",), "norm": ("RMSNorm",)}


def kind_of(model: nn.Module, m: nn.Module) -> str | None:
    """A module's kind by its class name (transformers' own, or ours: PackedExperts), the LM head by identity."""
    if m is model.get_output_embeddings():
        return "lm_head"
    return next((k for k, ends in KINDS.items() if type(m).__name__.endswith(ends)), None)


def label_modules(model: nn.Module) -> None:
    """Wrap the forward of every module of a named kind in a record_function of that kind."""
    for m in model.modules():
        kind = kind_of(model, m)
        if kind is None:
            continue
        inner = m.forward

        def forward(*args, _inner=inner, _kind=kind, **kwargs):
            with record_function(_kind):
                return _inner(*args, **kwargs)

        m.forward = forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", help="the unquantized tensors' dtype (default: load_model's)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32, help="0: profile the prefill")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-dynamic-pruning", dest="dynamic_pruning", action="store_false")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, getattr(torch, a.dtype) if a.dtype else None, dynamic_pruning=a.dynamic_pruning)
    label_modules(model)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids[:, :16], use_cache=True)  # warm-up
        out = model(input_ids=ids if a.gen_len else ids[:, :16], use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            if a.gen_len == 0:
                with record_function("model"):
                    model(input_ids=ids, use_cache=True)
            for _ in range(a.gen_len):
                with record_function("model"):
                    out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            wall = time.perf_counter() - t0
    events = {e.key: e for e in prof.key_averages()}
    steps = max(a.gen_len, 1)
    print(f"{a.model}: {'decode' if a.gen_len else 'prefill'}, {steps} step(s), {wall / steps * 1e3:.2f} ms per step, "
          f"dtype {next(model.parameters()).dtype}, {a.threads} threads")
    total = events["model"].cpu_time_total if "model" in events else wall * 1e6
    named = ["experts", "router", "attention", "lm_head", "norm"]
    for k in named:
        if k in events:
            e = events[k]
            print(f"  {k:<10} {e.cpu_time_total / steps / 1e3:8.3f} ms per step  {e.cpu_time_total / total:6.1%}  "
                  f"({e.count // steps} calls per step)")
    print(f"  model forward {total / steps / 1e3:8.3f} ms per step; profiled wall {wall / steps * 1e3:.3f} ms")
    ops = [e for e in prof.key_averages() if e.key not in named + ["model"]]
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    print("  aten operators by self CPU time (per step):")
    for e in ops[: a.top]:
        print(f"    {e.key:<40} {e.self_cpu_time_total / steps / 1e3:8.3f} ms  {e.count // steps:5d} calls")


if __name__ == "__main__":
    main()
