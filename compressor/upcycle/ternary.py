"""Ternary experts for training and detection (torch only).

ternarize      W -> s * clip(round(W / s), -1, 1), s = fp16(mean|W|) per (row, group): the toolkit's
               absmean grid (quantize/grid.py), vectorised; equal to quantize_ternary(W).dequantize()
TernarySTE     a parametrization: the forward sees ternarize(latent), the gradient reaches the latent
               fp weights unchanged (straight-through estimator, BitNet b1.58 / MoTE)
is_ternary     (from quantize.ternary) per expert: is every (row, group) already in {-s, 0, s}?

Absmean alone is not idempotent (a group {-s, 0, s} with a fraction p of nonzeros has absmean p*s);
the toolkit's ternary grid keeps s for groups already on a ternary grid, so a MoTE checkpoint
re-packs losslessly through quantize_ternary and GPTQ alike (tests/test_quantize_rtn.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize.formats import DEFAULT_GROUP_SIZE, QuantSpec, group_size_for
from ..quantize.grid import fp16_round


def _grouped(W: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """W [..., out, in] -> [..., out, G, gs] (zero-padded to a whole number of groups), in."""
    n = W.shape[-1]
    gs = group_size_for(QuantSpec("ternary", group_size), n)
    pad = (-n) % gs
    Wp = F.pad(W, (0, pad)) if pad else W
    return Wp.reshape(*W.shape[:-1], Wp.shape[-1] // gs, gs), n


def ternarize(W: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """W [..., out, in] -> float32 [..., out, in], absmean ternary per (row, group) on the toolkit's grid.
    A short last group takes its mean over its own columns only (as quantize_ternary does)."""
    Wg, n = _grouped(W.float(), group_size)  # [..., out, G, gs]
    gs = Wg.shape[-1]
    counts = torch.full(Wg.shape[-2:-1], gs, dtype=torch.float32)  # [G]
    counts[-1] = n - gs * (Wg.shape[-2] - 1)
    if counts[-1] == gs:
        s = Wg.abs().mean(-1)  # same reduction as grid.find_params
    else:
        s = Wg.abs().sum(-1) / counts
    s = fp16_round(s)[..., None]  # [..., out, G, 1]
    q = torch.round(Wg / s).clamp(-1, 1)
    return (q * s).reshape(*W.shape[:-1], -1)[..., :n]


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W: torch.Tensor, group_size: int) -> torch.Tensor:
        return ternarize(W, group_size).to(W.dtype)  # exactly the ternary values, not W + (T - W)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # straight through to the latent weights


class TernarySTE(nn.Module):
    """torch.nn.utils.parametrize parametrization: latent fp weights, ternary forward."""

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        self.group_size = group_size

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return _STE.apply(W, self.group_size)
