"""The compiled kernels (packed.cpp): built once per machine with the system C++ compiler, loaded with ctypes.

No torch headers, no ninja: one g++ call (about 3 s), the shared object kept in `$MOE_COMPRESSOR_CACHE/kernels/`
under a name keyed by the source, the compiler and the CPU's flags (it is built with -march=native). Its OpenMP
runtime is torch's own (both link `libgomp.so.1`, which the process has loaded once), so threads are shared, not
doubled. When there is no compiler, the build fails, or `MOE_COMPRESSOR_KERNELS=torch` (or `dequant`) is set, `library()` returns
None and the runtime uses its pure-torch paths (kernels/torch_paths.py); why is in `unavailable_reason()`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("packed.cpp")
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
ENV = "MOE_COMPRESSOR_KERNELS"  # "torch": never build or load the compiled kernels; "dequant": nor torch's packed ones
KIND = {"int": 0, "ternary": 1, "ggml": 2, "f16": 3, "bf16": 4}
OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_reason: str | None = None


class Mat(ctypes.Structure):
    """struct Mat of packed.cpp: one packed [N, K] matrix, by pointers into tensors its owner keeps alive."""

    _fields_ = [("kind", ctypes.c_int32), ("bits", ctypes.c_int32), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("q", ctypes.c_void_p), ("rowbytes", ctypes.c_int64), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("G", ctypes.c_int64), ("gs", ctypes.c_int64)]


def _cpu_key() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build(cxx: str, target: Path, flags: list[str] = FLAGS) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([cxx, *flags, str(SOURCE), "-o", str(out)], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(out, target)  # atomic: a concurrent build writes the same bytes


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The entry points' signatures, on a loaded build."""
    lib.mc_gemv.argtypes = [ctypes.POINTER(Mat), ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                            ctypes.c_int64, ctypes.c_int]
    lib.mc_gemv.restype = None
    lib.mc_dequant.argtypes = [ctypes.POINTER(Mat), ctypes.c_void_p, ctypes.c_int32, ctypes.c_int]
    lib.mc_dequant.restype = None
    lib.mc_experts.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.POINTER(Mat), ctypes.POINTER(Mat), ctypes.c_int32, ctypes.c_void_p,
                               ctypes.c_int]
    lib.mc_experts.restype = None
    lib.mc_linear.argtypes = [ctypes.POINTER(Mat), ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                              ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int]
    lib.mc_linear.restype = None
    return lib


def build_for(march: str, target: Path) -> ctypes.CDLL:
    """The kernels compiled for `-march=march` instead of this CPU (tests: the AVX512F and scalar tiers, which a CPU
    with AVX512-BF16 runs too), loaded from `target`."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    _build(cxx, target, [f"-march={march}" if f == "-march=native" else f for f in FLAGS])
    return _declare(ctypes.CDLL(str(target)))


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (see unavailable_reason)."""
    global _reason
    if os.environ.get(ENV, "").lower() in ("torch", "dequant"):
        _reason = f"{ENV}={os.environ[ENV]}"
        return None
    cxx = _compiler()
    if cxx is None:
        _reason = "no C++ compiler (g++) on PATH"
        return None
    from ...assets import CACHE_DIR

    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        sources = b"".join(f.read_bytes() for f in [SOURCE, *HEADERS])
        key = hashlib.sha256(sources + version.encode() + _cpu_key().encode() + " ".join(FLAGS).encode())
        target = CACHE_DIR / "kernels" / f"packed-{key.hexdigest()[:16]}.so"
        if not target.exists():
            _build(cxx, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        _reason = f"building {SOURCE.name} failed: {detail.strip()[:500]}"
        return None
    return _declare(lib)


def unavailable_reason() -> str | None:
    library()
    return _reason


def gemv(lib: ctypes.CDLL, mat: Mat, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 contiguous -> [M, N] float32."""
    y = torch.empty(x.shape[0], mat.N, dtype=torch.float32)
    lib.mc_gemv(ctypes.byref(mat), x.shape[0], x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                torch.get_num_threads())
    return y


def linear(lib: ctypes.CDLL, mat: Mat, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float32 / bfloat16 / float16) -> x W^T (+ bias) [..., N] in x's dtype, converted inside."""
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], mat.N, dtype=x.dtype)
    b = None if bias is None else bias.contiguous()
    lib.mc_linear(ctypes.byref(mat), x.numel() // mat.K, x.data_ptr(), OUT_KIND[x.dtype],
                  None if b is None else b.data_ptr(), OUT_KIND[b.dtype] if b is not None else 0, y.data_ptr(),
                  OUT_KIND[y.dtype], torch.get_num_threads())
    return y


def dense_mat(weight: torch.Tensor) -> Mat:
    """A 16-bit [N, K] weight (contiguous, on the CPU) as a Mat: the compiled products of a model's own linear layers."""
    kind = {torch.float16: "f16", torch.bfloat16: "bf16"}[weight.dtype]
    N, K = weight.shape
    return Mat(KIND[kind], 16, N, K, weight.data_ptr(), 2 * K, None, None, 1, K)


def dequant_into(lib: ctypes.CDLL, mat: Mat, out: torch.Tensor) -> torch.Tensor:
    """The whole matrix into `out` ([N, K] contiguous, float32 / bfloat16 / float16)."""
    lib.mc_dequant(ctypes.byref(mat), out.data_ptr(), OUT_KIND[out.dtype], torch.get_num_threads())
    return out
