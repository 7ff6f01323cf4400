"""A compressed model's own 16-bit linear layers (attention projections, the LM head) at decode sizes through the
compiled kernels (kernels/packed.cpp, 16-bit weights): torch's CPU bfloat16 and float16 matmuls (oneDNN) cost tens
of microseconds per call at one row before they read a weight (measured: bfloat16 48 us for a 576 x 576 matrix at
one row against 20 us in float32, 2-3x our path's time on the attention shapes of the reference MoE; float16 27-126 us
against our 9-53 us on 256 x 256 and 576 x 576, equal on the 49152 x 576 LM head), which a decode step pays a few
hundred times, and more on a loaded machine.

`accelerate(model)` gives every `nn.Linear` with a 16-bit weight on the CPU a forward that takes the compiled
product for up to GEMV_ROWS rows and F.linear otherwise (same weights, same dtype out, float32 accumulation). The
module, its parameters and its state dict are untouched; `restore(model)` removes the forwards. Without the compiled
kernels nothing is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import GEMV_ROWS, native

DTYPES = (torch.bfloat16, torch.float16)


class _Forward:
    def __init__(self, lib, lin: nn.Linear):
        self.lib, self.lin = lib, lin
        self.weight, self.mat = None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.lin
        rows = x.numel() // max(x.shape[-1], 1)
        w = lin.weight
        if rows > GEMV_ROWS or x.device.type != "cpu" or w.dtype not in DTYPES or not w.is_contiguous():
            return F.linear(x, w, lin.bias)
        if w is not self.weight:  # first call, or the parameter was replaced
            self.weight, self.mat = w, native.dense_mat(w)
        if lin.bias is not None and lin.bias.dtype != x.dtype or x.dtype not in native.OUT_KIND:
            return F.linear(x, w, lin.bias)
        return native.linear(self.lib, self.mat, x, lin.bias)


def accelerate(model: nn.Module) -> int:
    """Install the decode forward on every 16-bit CPU nn.Linear; returns how many."""
    lib = native.library()
    if lib is None:
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype in DTYPES and m.weight.device.type == "cpu":
            m.forward = _Forward(lib, m)
            n += 1
    return n


def restore(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), _Forward):
            del m.forward
