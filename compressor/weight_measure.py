"""Data-free measurements for MoE blocks that calibration text does not reach (MLPMoE blocks in a vision tower
or a projector take images): the budget LP plans them from their weights alone.

Per expert e and candidate format f (RTN or ternary, as the measurement pass's candidates):
    eps_sq[e, f] = ||W_gu - Q_f(W_gu)||^2 + ||W_down - Q_f(W_down)||^2     (weight-space error)
    out_energy   = the block's summed squared weights, so `global` costs are relative weight errors
    routing      = uniform (every expert equally used, weight 1/k per slot); hess_err = eps_sq.
A proxy for the output error the measurement pass measures, not a measurement of it: nothing here has
seen an input. Frequency-based objectives see uniform routing.
"""

from __future__ import annotations

import torch

from .arch.view import MoEBlock
from .calibration.stats import check_finite_weights
from .measure import BlockMeasurement, candidates


def weight_measurements(blocks: list[MoEBlock], formats: list[str], group_size: int, sym: bool,
                        scale_dtype: str = "float16") -> list[BlockMeasurement]:
    out = []
    for b in blocks:
        gu, d = b.gate_up().detach().float(), b.down().detach().float()
        check_finite_weights(b.name, gu, d)
        eps_sq = torch.stack([(candidates(gu, f, group_size, sym, scale_dtype=scale_dtype) - gu).pow(2).sum(dim=(1, 2)) +
                              (candidates(d, f, group_size, sym, scale_dtype=scale_dtype) - d).pow(2).sum(dim=(1, 2)) for f in formats], dim=1)
        E = b.num_experts  # one token per expert: top_k slots each, their weights summing to 1 per token
        count, weight_sum = torch.full((E,), b.top_k), torch.ones(E)
        energy = float(gu.pow(2).sum() + d.pow(2).sum())
        out.append(BlockMeasurement(b.name, b.layer_idx, list(formats), count, weight_sum, E, eps_sq, eps_sq.clone(),
                                    out_energy=energy))
    return out
