"""Products of packed matrices, chosen per matrix at load time: `kernel_for(tensors, spec, out, in)` returns a
callable x [M, in] -> [M, out] (x's dtype) that computes from the checkpoint's own tensors.

  path            formats                       rows of x <= GEMV_ROWS (decode)       more rows (prefill)
  native          all (int2-8, ternary,         compiled kernel on the packed bytes   compiled dequantization into a
                  ggml types, keep)             (kernels/packed.cpp)                  reused buffer, then the library
                                                                                      GEMM (bf16: AMX / oneDNN)
  torch-int4pack  int4 (group size allowing)    torch's int4 CPU kernel               table-driven unpack into the
  torch-int8pack  int8, one group per row       torch._weight_int8pack_mm             reused buffer, then the GEMM
  torch           all                           table-driven unpack + GEMM            the same

`native` needs the compiled kernels (kernels/native.py) and CPU tensors; the torch paths run anywhere. Nothing is
dequantized beyond one matrix at a time, into `WORKSPACE` (one buffer per dtype, the size of the largest matrix:
the runtime's fixed overhead). The forward is not re-entrant across threads (the buffer is shared).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from ...quantize.formats import QuantSpec, group_size_for, num_groups
from . import native
from .torch_paths import Int4PackLinear, Int8PackLinear, dequantize_into, int4pack_group, int8pack_fits

GEMV_ROWS = 8  # rows of x up to which the decode kernels run; more rows: dequantize into the workspace + GEMM


class Workspace:
    """One flat buffer per dtype, grown to the largest matrix asked for; views of it hold a dequantized matrix
    for the length of one product."""

    def __init__(self):
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < rows * cols:
            buf = self.buffers[key] = torch.empty(rows * cols, dtype=dtype, device=device)
        return buf[: rows * cols].view(rows, cols)

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


WORKSPACE = Workspace()


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the dequantized operand: x's, but float32 for float16 on a CPU (no fast fp16 GEMM there)."""
    return torch.float32 if x.dtype == torch.float16 and x.device.type == "cpu" else x.dtype


class Kernel:
    """Base: the large-row path (dequantize into the workspace, library GEMM); subclasses add a decode path."""

    path = "torch"
    extra_bytes = 0  # bytes held beyond the checkpoint's tensors (a kernel's own layout)

    def __init__(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, out_features: int, in_features: int):
        self.tensors, self.spec, self.N, self.K = tensors, spec, out_features, in_features
        self.versions = {n: t._version for n, t in tensors.items()}

    def current(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Built on these very tensors, unmodified since (a derived layout would otherwise be stale)."""
        return all(tensors.get(n) is t and t._version == self.versions[n] for n, t in self.tensors.items())

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        return dequantize_into(self.tensors, self.spec, self.N, self.K, out)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        dt = gemm_dtype(x)
        w = self.dequantize_into(WORKSPACE.get(self.N, self.K, dt, x.device))
        return F.linear(x.to(dt), w).to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x) if x.shape[0] <= GEMV_ROWS else self.gemm(x)


class NativeKernel(Kernel):
    path = "native"

    def __init__(self, lib, tensors, spec, out_features, in_features):
        super().__init__(tensors, spec, out_features, in_features)
        self.lib = lib
        self.mat = _mat(tensors, spec, out_features, in_features)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        if out.dtype not in native.OUT_KIND:
            return super().dequantize_into(out)
        return native.dequant_into(self.lib, self.mat, out)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in native.OUT_KIND:
            return native.gemv(self.lib, self.mat, x.float().contiguous()).to(x.dtype)
        return native.linear(self.lib, self.mat, x)


class TorchPackKernel(Kernel):
    """Decode through one of torch's own packed kernels (Int4PackLinear, Int8PackLinear)."""

    def __init__(self, kernel: Callable[[torch.Tensor], torch.Tensor], path: str, tensors, spec, out_features,
                 in_features):
        super().__init__(tensors, spec, out_features, in_features)
        self.kernel, self.path, self.extra_bytes = kernel, path, kernel.extra_bytes

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


def _mat(tensors: dict[str, torch.Tensor], spec: QuantSpec, n_out: int, n_in: int) -> native.Mat:
    ptr = lambda name: tensors[name].data_ptr() if name in tensors else None
    if spec.format == "keep":
        return native.Mat(native.KIND["f16"], 16, n_out, n_in, ptr("weight"), 2 * n_in, None, None, 1, n_in)
    kind = "ggml" if spec.ggml is not None else ("ternary" if spec.format == "ternary" else "int")
    bits = spec.ggml.type_id if spec.ggml is not None else (spec.bits or 0)
    return native.Mat(native.KIND[kind], bits, n_out, n_in, ptr("qweight"), tensors["qweight"].shape[-1],
                      ptr("scales"), ptr("zeros"), num_groups(spec, n_in), group_size_for(spec, n_in))


def kernel_for(tensors: dict[str, torch.Tensor], spec: QuantSpec, out_features: int, in_features: int,
               act_dtype: torch.dtype = torch.bfloat16) -> Kernel:
    """The fastest path this process has for one packed matrix (see the module docstring); `act_dtype` is the
    activations' dtype, which torch's own packed kernels are built for."""
    args = (tensors, spec, out_features, in_features)
    on_cpu = all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    lib = native.library() if on_cpu else None
    if lib is not None and spec.format != "drop":
        return NativeKernel(lib, *args)
    if on_cpu and act_dtype == torch.bfloat16 and os.environ.get(native.ENV, "") != "dequant":
        if int4pack_group(spec, out_features, in_features) is not None:
            return TorchPackKernel(Int4PackLinear(*args), "torch-int4pack", *args)
        if int8pack_fits(spec, in_features):
            return TorchPackKernel(Int8PackLinear(*args), "torch-int8pack", *args)
    return Kernel(*args)


def prepare(model: torch.nn.Module, act_dtype: torch.dtype) -> dict:
    """Choose every packed matrix's kernel now (at load, not in the first forward; builds the compiled kernels once
    per machine), give the model's own 16-bit linear layers the compiled decode path (runtime/linear.py), and
    return `report(model)`."""
    from .. import linear
    from ..experts import PackedMatrix

    for m in model.modules():
        if isinstance(m, PackedMatrix) and m.spec.format != "drop":
            m.kernel(act_dtype)
    linear.accelerate(model)
    return report(model)


def report(model: torch.nn.Module) -> dict:
    """Kernel paths in use ({path: matrices}, the model's own accelerated linear layers included), the bytes their
    own layouts hold beyond the checkpoint's tensors, and the bytes of the shared workspace so far."""
    from ..experts import PackedMatrix

    from ..linear import _Forward

    paths: dict[str, int] = {}
    extra = 0
    for m in model.modules():
        k = m.__dict__.get("_kernel") if isinstance(m, PackedMatrix) else None
        if k is not None:
            paths[k.path] = paths.get(k.path, 0) + 1
            extra += k.extra_bytes
        if isinstance(m.__dict__.get("forward"), _Forward):
            paths["16-bit linear, compiled decode"] = paths.get("16-bit linear, compiled decode", 0) + 1
    return {"paths": paths, "extra_bytes": extra, "workspace_bytes": WORKSPACE.nbytes(),
            "native": native.unavailable_reason() or "built"}
