"""llama.cpp as a peer and as the runtime our GGUF exports must run in. Never a dependency of the package or CI.

Build (about 20-40 minutes on two busy cores; see ../shared/serving.md), once, outside the repository:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36      # the sdist vendors llama.cpp
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \\
        -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON \\
        -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \\
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \\
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_LLGUIDANCE=OFF -DLLAMA_BUILD_TOOLS=ON
    cmake --build build -j2 --target llama-quantize llama-imatrix llama-perplexity llama-bench llama
    cd ../.. && CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install --no-deps ../llama_cpp_python-0.3.36.tar.gz
    pip install diskcache                     # the Python bindings, loading the libllama.so built above
    export LLAMA_CPP_DIR=$PWD/vendor/llama.cpp

On a CPU without AVX-512 (seen here too: an AMD EPYC with AVX2 only) the AVX512 flags must be OFF, or every run
dies of an illegal instruction; GGML_NATIVE=ON is then fine (no AMX to avoid). AMX is off on purpose: with
GGML_NATIVE=ON this machine's CPU (AMX-INT8) gets ggml's AMX matmul, which crashed
(SIGSEGV in ggml_backend_amx_mul_mat) on every 2-D quantized tensor, llama-quantize's own Q8_0 and Q4_K_M files
included; on a tiny Mixtral whose 2-D tensors are all F16 its largest logit difference from ours was 0.28 standard
deviations, against 0.04 for the AVX-512 build.

`LLAMA_CPP_DIR` (default: /work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp) is the llama.cpp tree holding
build/bin. The bindings give logits for token ids we choose, so llama.cpp is scored with exactly this project's
perplexity protocol (the same tokenizer, the same non-overlapping windows) rather than llama-perplexity's.
"""
from __future__ import annotations

import csv
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path("/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp")


class LlamaCppMissing(RuntimeError):
    pass


def llama_dir() -> Path:
    return Path(os.environ.get("LLAMA_CPP_DIR", DEFAULT_DIR))


def bin_dir() -> Path:
    return llama_dir() / "build" / "bin"


def tool(name: str) -> Path:
    path = bin_dir() / name
    if not path.is_file():
        raise LlamaCppMissing(f"{path} not found: build llama.cpp as evals/llamacpp.py's docstring says and set "
                              "LLAMA_CPP_DIR to its tree")
    return path


def run_tool(name: str, *args, log: Path | None = None, threads: int = 2) -> str:
    cmd = [str(tool(name)), *map(str, args)]
    if name != "llama-quantize":
        cmd += ["-t", str(threads)]
    else:
        cmd += [str(threads)]  # llama-quantize takes nthreads as its last positional argument
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir())})
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def load(gguf: Path, n_ctx: int = 512, threads: int = 2, f32_cache: bool = False):
    """A llama_cpp.Llama over `gguf` returning logits for every position; `f32_cache`: keys and values cached in
    float32 (F16 by default)."""
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(bin_dir()))
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise LlamaCppMissing(f"the llama_cpp bindings are not installed ({err}): see evals/llamacpp.py") from None
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                 n_threads=threads, n_threads_batch=threads, verbose=False, **cache)


def window_logits(llm, window: torch.Tensor) -> np.ndarray:
    """[L, vocab] float32 logits of one window of token ids, from a fresh context."""
    llm.reset()  # eval() then drops the KV cache past position 0
    llm.eval(window.tolist())
    return np.array(llm.scores[: window.numel()], dtype=np.float32)


def perplexity(gguf: Path, windows: torch.Tensor, threads: int = 2) -> dict:
    """This project's perplexity protocol (api.perplexity) run by llama.cpp: each window [n, L] from a fresh
    context, every next token scored."""
    llm = load(gguf, windows.shape[1], threads)
    nll, count = 0.0, 0
    for w in windows:
        logits = torch.from_numpy(window_logits(llm, w))
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum"))
        count += w.numel() - 1
    return {"perplexity": math.exp(nll / count), "tokens": count}


def tokenize(gguf: Path, text: str) -> list[int]:
    """llama.cpp's own tokenization of `text` (no BOS), to check the exported tokenizer."""
    llm = load(gguf, 64)
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def bench(gguf: Path, prompt: int = 128, gen: int = 32, threads: int = 2, reps: int = 3) -> dict:
    """llama-bench prefill (pp) and decode (tg) tokens/s."""
    out = run_tool("llama-bench", "-m", gguf, "-p", prompt, "-n", gen, "-r", reps, "-o", "csv", threads=threads)
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip('"').startswith("build_commit"))
    result = {}
    for rec in csv.DictReader(lines[start:]):  # the header line is unquoted, the rows quoted (csv handles both)
        kind = "prefill" if int(rec["n_prompt"]) > 0 else "decode"
        result[f"{kind}_tok_s"] = float(rec["avg_ts"])
        result[f"{kind}_tok_s_sd"] = float(rec["stddev_ts"])
    return result


def quantize(f16: Path, out: Path, qtype: str, imatrix: Path | None = None, keep: tuple[str, ...] = (),
             threads: int = 2, log: Path | None = None) -> None:
    """llama-quantize `f16` to `qtype` (Q2_K, Q3_K_M, ...); tensors matching any regex in `keep` stay F16, and
    so do the token embedding and the output head (this project's rows quantize routed experts only)."""
    args = ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    for pattern in keep:
        args += ["--tensor-type", f"{pattern}=f16"]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    run_tool("llama-quantize", *args, f16, out, qtype, log=log, threads=threads)


def compute_imatrix(f16: Path, text: Path, out: Path, ctx: int = 512, chunks: int = 32, threads: int = 2,
                    log: Path | None = None) -> None:
    run_tool("llama-imatrix", "-m", f16, "-f", text, "-o", out, "-c", ctx, "--chunks", chunks, log=log,
             threads=threads)


def tensor_bytes(gguf: Path, pattern: str = r"_exps\.") -> int:
    """Bytes of the tensors of a GGUF file whose names match `pattern` (default: the routed experts)."""
    import gguf as gg

    return sum(int(t.n_bytes) for t in gg.GGUFReader(str(gguf)).tensors if re.search(pattern, t.name))


def tensor_types(gguf: Path, pattern: str = r"_exps\.") -> dict[str, int]:
    """How many tensors matching `pattern` each ggml type holds."""
    import gguf as gg

    counts: dict[str, int] = {}
    for t in gg.GGUFReader(str(gguf)).tensors:
        if re.search(pattern, t.name):
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
