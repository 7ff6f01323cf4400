"""Expert importance signals, pure tensor functions of calibration data (torch only).

- frequency phi_e: share of tokens routed to expert e; routing score w_e: its summed top-k weight.
- output error eps[e, f]: MC-MoE's activation reconstruction error, the error of the MoE block's
  output on its routed tokens when only expert e is quantized to format f. Other experts are
  unchanged, so this is exactly || sum_t w_t (E_f(x_t) - E(x_t)) || over the tokens routed to e.
- hessian error: tr(dW H dW^T) of both matrices (quantize.gptq.hessian_error), from the Hessians alone.
"""

from __future__ import annotations

from typing import Callable

import torch


def expert_forward(x: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor, apply_gate: Callable,
                   b_gu: torch.Tensor | None = None, b_d: torch.Tensor | None = None) -> torch.Tensor:
    """x [n, H]; w_gu [..., 2I, H]; w_d [..., H, I] -> [..., n, H] (leading dims: candidate formats)."""
    h = x @ w_gu.transpose(-1, -2)  # [..., n, 2I]
    if b_gu is not None:
        h = h + b_gu
    y = apply_gate(h) @ w_d.transpose(-1, -2)  # [..., n, H]
    return y if b_d is None else y + b_d


def output_error_sq(x: torch.Tensor, weights: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor,
                    cand_gu: torch.Tensor, cand_d: torch.Tensor, apply_gate: Callable,
                    b_gu: torch.Tensor | None = None, b_d: torch.Tensor | None = None) -> torch.Tensor:
    """Squared block-output error per candidate: x [n, H], weights [n], w_gu [2I, H], w_d [H, I],
    cand_gu [F, 2I, H], cand_d [F, H, I] -> [F]."""
    ref = expert_forward(x, w_gu, w_d, apply_gate, b_gu, b_d)  # [n, H]
    out = expert_forward(x, cand_gu, cand_d, apply_gate, b_gu, b_d)  # [F, n, H]
    return ((out - ref) * weights[:, None]).pow(2).sum(dim=(-1, -2))


def mcmoe_weights(count: torch.Tensor, weight_sum: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phi [E] (share of tokens routed to each expert) and w [E] (mean routing weight per token)."""
    n = max(total_tokens, 1)
    return count.float() / n, weight_sum.float() / n
