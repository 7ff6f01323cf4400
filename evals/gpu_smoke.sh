#!/usr/bin/env bash
# GPU smoke test of --device cuda and of NCCL ranks. NOT RUN: no GPU was available where this was written; the CUDA
# path is untested. On a machine with CUDA GPUs and the CUDA build of torch 2.13.0:
#
#   evals/gpu_smoke.sh [MODEL_DIR]        # default: the shipped default model
#
# It checks, and stops at the first failure:
#   1. one process on cuda: a budget compress (pass 1, layer sensitivity, LP, GPTQ) writes a model the CPU evaluates
#   2. Hessians kept on the host (--hessians cpu) give the same tensors as Hessians on the GPU
#   3. torchrun over every GPU (NCCL) writes the same tensors as one process on cuda (deterministic cuBLAS asked for;
#      a difference here may also be a nondeterministic GPU kernel, e.g. in the sensitivity's attention backward)
#   4. the cuda output against a CPU run of the same command: the same plan is expected; tensors may differ in rounding
#      (GPU kernels sum in other orders), so this step reports, it does not fail
set -euo pipefail
cd "$(dirname "$0")/.."
export CUBLAS_WORKSPACE_CONFIG=:4096:8
MODEL="${1:-compressor/assets/default_model}"
OUT="${OUT:-/tmp/moe-compressor-gpu-smoke}"
PY="${PY:-python}"
GPUS="$($PY -c 'import torch; print(torch.cuda.device_count())')"
[ "$GPUS" -ge 1 ] || { echo "no CUDA device visible to torch: nothing to smoke-test"; exit 1; }
rm -rf "$OUT"; mkdir -p "$OUT"
ARGS=(compress "$MODEL" --budget 3.25bits --budget-scope experts --samples 32 --no-measurement-cache)

echo "== 1. one process on cuda"
$PY cli.py "${ARGS[@]}" --device cuda -o "$OUT/cuda"
$PY cli.py eval "$OUT/cuda" --ppl compressor/assets/corpora/heldout_pydocs.txt --seq-len 256

echo "== 2. Hessians on the host"
$PY cli.py "${ARGS[@]}" --device cuda --hessians cpu -o "$OUT/cuda-hcpu"

echo "== 3. torchrun over $GPUS GPU(s), NCCL"
torchrun --nproc-per-node "$GPUS" cli.py "${ARGS[@]}" --device cuda -o "$OUT/ranks"

echo "== 4. the same on the CPU"
$PY cli.py "${ARGS[@]}" --device cpu -o "$OUT/cpu"

$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from compressor.io.checkpoint import read_tensors
out = Path(sys.argv[1])
def same(a, b):
    ta, tb = read_tensors(out / a), read_tensors(out / b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
plan = lambda d: json.loads((out / d / "plan.json").read_text())["experts"]
ok = True
for a, b in (("cuda", "cuda-hcpu"), ("cuda", "ranks")):
    print(f"{a} vs {b}: {'identical' if same(a, b) else 'DIFFERENT'}")
    ok &= same(a, b)
print(f"cuda vs cpu: plan {'the same' if plan('cuda') == plan('cpu') else 'different'}, tensors "
      f"{'identical' if same('cuda', 'cpu') else 'differ (rounding; expected)'}")
sys.exit(0 if ok else 1)
PYEOF
echo "GPU smoke test passed"
