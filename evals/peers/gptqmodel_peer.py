"""GPTQModel as a peer row: the same model, bits, group size and calibration tokens through GPTQModel's GPTQ.

Runs in its own virtual environment, never in the project's: GPTQModel is not a dependency of
moe-compressor (not even an optional extra). It pulls in datasets, pyarrow, torchao, accelerate and pins
numpy, and its newest release wants torch>=2.14.1, which on PyPI is the multi-GB CUDA build; 7.6.0 is the
newest that accepts the project's torch==2.13.0 CPU build. Set up once (see evals/peers/GPTQMODEL.md):

    python3 -m venv .venv-gptqmodel
    .venv-gptqmodel/bin/pip install torch==2.13.0
    .venv-gptqmodel/bin/pip install gptqmodel==7.6.0 torch==2.13.0
    .venv-gptqmodel/bin/pip install -e . matplotlib torch==2.13.0

then, from the repository root:

    .venv-gptqmodel/bin/python -m evals.peers.gptqmodel_peer --points 2.25b,2.5b,3.25b,3.5b --max-tokens 16384

Each point of evals.compare.BUDGET_POINTS (2.5b = int2/g64, ...) is quantized by GPTQModel into
evals/runs/peers/<model>/<point>-gptqmodel/ (kept; an existing one is evaluated again, not re-quantized)
with the settings of the project's uniform GPTQ row at that point: asymmetric, no act-order, damping 0.01,
attention and router left 16-bit (GPTQModel `dynamic` rule `-:.*self_attn.*`; the router and lm_head it
never quantizes), the same 128 x 512 calibration windows (compressor.api.calibration_data, seed 0).
GPTQModel's own defaults stay where the project has no such knob (group-aware reordering `act_group_aware`,
true-sequential, RTN fallback for experts reached by <0.5% of the tokens; none was on this model).

Bytes are counted from the written safetensors headers like every other row (evals.compare.expert_bytes).
Perplexity is evals.compare.evaluate_model on the model with GPTQModel's packed weights dequantized once
into fp32 nn.Linear layers, i.e. the same fp32 forward as the project's rows, so the difference between
rows is the quantized weights alone. GPTQModel's own CPU kernel (TorchLinear) runs only in fp16/bf16;
`--native` also evaluates through it (fp16) and records that as `perplexity_native_fp16`.

Rows are merged as `<point>-gptqmodel` into evals/results/budget_<model>.json when it exists (otherwise
evals/results/gptqmodel_<model>.json), and the markdown table and plot beside it are rewritten with
evals.compare's own functions. Use the --max-tokens that file was made with (16384 for the default model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

# GPTQModel 7.6.0 sizes its CPU pool at (cores + 1) // 2 workers but its model-loader sub-pool at 2, and
# refuses to start when the first is smaller ("Virtual pool 'model_loader:cpu' requests 2 workers but parent
# 'cpu' only has 1") -- on any machine with 2 cores. Its own override, read when gptqmodel is imported:
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compressor import api  # noqa: E402
from compressor.assets import DEFAULT_MODEL_DIR  # noqa: E402
from compressor.config import Recipe, apply_overrides  # noqa: E402
from compressor.io.checkpoint import tensor_nbytes  # noqa: E402
from compressor.io.models import load_tokenizer  # noqa: E402
from evals.compare import BUDGET_POINTS, RESULTS, ROOT, evaluate_model, expert_bytes, markdown, plot  # noqa: E402

SKIP_ATTENTION = {r"-:.*self_attn.*": {}}  # GPTQModel `dynamic`: leave attention 16-bit, as --dense-bits 16


def calibration(model_dir: Path, samples: int, seq_len: int, seed: int) -> list[dict]:
    """The project's calibration windows for this model, as GPTQModel takes them."""
    recipe = apply_overrides(Recipe(), {"model": str(model_dir), "calibration.samples": samples,
                                        "calibration.seq_len": seq_len, "calibration.seed": seed})
    windows = api.calibration_data(recipe, load_tokenizer(model_dir))
    return [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows]


def settings(bits: int, group: int, damp: float, samples: int, seq_len: int) -> dict:
    import gptqmodel

    return {"peer": f"gptqmodel {gptqmodel.__version__}", "bits": bits, "group_size": group, "sym": False,
            "desc_act": False, "damp_percent": damp, "dynamic": SKIP_ATTENTION, "calibration.samples": samples,
            "calibration.seq_len": seq_len, "quantize_dtype": "float16"}


def quantize(model_dir: Path, out: Path, bits: int, group: int, calib: list[dict], damp: float) -> float:
    """GPTQModel's GPTQ on the CPU; returns wall seconds (load, quantize, pack and save)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    t0 = time.time()
    qc = QuantizeConfig(bits=bits, group_size=group, sym=False, desc_act=False, damp_percent=damp,
                        device="cpu", dynamic=dict(SKIP_ATTENTION))
    # Loaded in the checkpoint's float16 (GPTQModel's CPU default is bfloat16). Its Hessians are fp32 either way;
    # loading in float32 would run the layer forwards in fp32 like the project's pass 2, but GPTQModel then
    # writes every tensor it does not quantize (embeddings, attention) in float32, doubling their bytes.
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(out):  # GPTQModel writes its per-module log to ./logs/ of the working directory
        model = GPTQModel.load(str(model_dir.resolve()), qc, dtype=torch.float16)
        model.quantize(calib, batch_size=8)
        model.save(str(out.resolve()))
    return round(time.time() - t0, 1)


def load_gptqmodel(out: Path, dtype: torch.dtype = torch.float16) -> nn.Module:
    """The quantized checkpoint through GPTQModel's own loader and CPU kernel (fp16 or bf16 only)."""
    from gptqmodel import GPTQModel

    return GPTQModel.load(str(out), device="cpu", dtype=dtype).model.eval()


def dequantized(model: nn.Module) -> nn.Module:
    """Every GPTQModel quantized linear replaced by an fp32 nn.Linear holding its dequantized weight."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseQuantLinear):
            continue
        with torch.no_grad():
            weight = module.dequantize_weight().float().t().contiguous()  # [in, out] -> [out, in]
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model.float().eval()


def run(model_dir: Path, points: list[str], max_tokens: int, seq_len: int, samples: int, damp: float,
        native: bool) -> dict:
    runs = ROOT / "runs" / "peers" / model_dir.name
    budget = RESULTS / f"budget_{model_dir.name}.json"
    results_path = budget if budget.exists() else RESULTS / f"gptqmodel_{model_dir.name}.json"
    calib = None
    for tag in points:
        bits, group = BUDGET_POINTS[tag]
        name, out = f"{tag}-gptqmodel", runs / f"{tag}-gptqmodel"
        if (out / "quantize_config.json").exists():
            secs = json.loads((out / "peer.json").read_text())["compress_seconds"]
        else:
            calib = calib or calibration(model_dir, samples, seq_len, seed=0)
            secs = quantize(model_dir, out, bits, group, calib, damp)
            (out / "peer.json").write_text(json.dumps({"compress_seconds": secs}))
        t0 = time.time()
        tok = load_tokenizer(out)
        extra = {}
        with torch.inference_mode():
            if native:
                extra["perplexity_native_fp16"] = evaluate_model(load_gptqmodel(out), tok, max_tokens, seq_len)
            ppl = evaluate_model(dequantized(load_gptqmodel(out)), tok, max_tokens, seq_len)
        row = {"total_bytes": sum(tensor_nbytes(out).values()), "expert_bytes": expert_bytes(out),
               "compress_seconds": secs, "perplexity": ppl, "accuracy": {},
               "eval_seconds": round(time.time() - t0, 1), "settings": settings(bits, group, damp, samples, seq_len),
               **extra}
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        results[name] = row
        RESULTS.mkdir(exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name}: {ppl}  ({row['total_bytes']:,} bytes, experts {row['expert_bytes']:,})"
              + (f"  native fp16 kernel: {extra['perplexity_native_fp16']}" if native else ""))
    results = json.loads(results_path.read_text())
    results_path.with_suffix(".md").write_text(markdown(results, max_tokens, seq_len, None))
    plot(results, results_path.with_suffix(".png"))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--points", default="2.5b", help=f"comma-separated among {', '.join(BUDGET_POINTS)}")
    p.add_argument("--max-tokens", type=int, default=32768, help="as evals.compare (same default)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping; the project's default is 0.01")
    p.add_argument("--native", action="store_true", help="also evaluate through GPTQModel's fp16 CPU kernel")
    a = p.parse_args()
    torch.manual_seed(0)
    run(a.model, [t for t in a.points.split(",") if t], a.max_tokens, a.seq_len, a.samples, a.damp, a.native)


if __name__ == "__main__":
    main()
