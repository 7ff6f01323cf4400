"""Per-expert calibration statistics: activation count, routing weight, and the Hessians H = X^T X of
each expert's gate/up input and down input (GPTQ's `add_batch`, per expert)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import NonFiniteError


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            f"NaN or inf in the activations of {where}; check the model weights and the calibration text, "
            "or run the model in float32"
        )


def check_finite_weights(name: str, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """The experts of block `name` ([E, out, in] each) hold finite weights, else an error naming the experts."""
    for part, W in (("gate_up", gate_up), ("down", down)):
        bad = (~torch.isfinite(W).flatten(1).all(1)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(f"NaN or inf in the weights of {name} expert(s) {bad} ({part}); the checkpoint is "
                                 "damaged: download or save the model again")


@dataclass
class ExpertStats:
    """Accumulated statistics of the E experts of one MoE block."""

    count: torch.Tensor  # [E] routed tokens
    weight_sum: torch.Tensor  # [E] summed top-k routing weight
    h_in: torch.Tensor  # [E, H, H] sum of x x^T
    h_mid: torch.Tensor  # [E, I, I] sum of h h^T (down-proj input)
    mass: torch.Tensor  # [E] what the Hessians are sums over (tokens, or routing probability mass)
    total_tokens: int = 0

    @classmethod
    def zeros(cls, num_experts: int, hidden: int, inter: int, device: torch.device | None = None,
              hessian_device: torch.device | None = None) -> "ExpertStats":
        """On `device` (default: the host); the Hessians on `hessian_device` (default: `device`)."""
        z, hd = partial(torch.zeros, device=device), hessian_device or device
        return cls(z(num_experts, dtype=torch.long), z(num_experts), torch.zeros(num_experts, hidden, hidden, device=hd),
                   torch.zeros(num_experts, inter, inter, device=hd), z(num_experts))

    def hessians(self) -> tuple[torch.Tensor, torch.Tensor]:  # mean x x^T: [E, H, H], [E, I, I]
        m = self.mass.clamp(min=1e-12)[:, None, None].to(self.h_in.device)
        return self.h_in / m, self.h_mid / m

    @property
    def frequency(self) -> torch.Tensor:  # [E] share of tokens routed to each expert
        return self.count.float() / max(self.total_tokens, 1)


class RoutedObserver:
    """Hessians from the tokens routed to each expert (the default). Plugs into `Experts.observer`."""

    def __init__(self, stats: ExpertStats, where: str):
        self.stats, self.where = stats, where

    def __call__(self, e: int, x: torch.Tensor, h: torch.Tensor, tok: torch.Tensor, weights: torch.Tensor) -> None:
        check_finite(x, f"{self.where} expert {e}")
        s = self.stats
        s.count[e] += x.shape[0]
        s.weight_sum[e] += weights.float().sum()
        s.h_in[e] += (x.T.float() @ x.float()).to(s.h_in.device)
        s.h_mid[e] += (h.T.float() @ h.float()).to(s.h_mid.device)
        s.mass[e] += x.shape[0]


class WeightedObserver(RoutedObserver):
    """Every expert sees every token, weighted by its routing probability: sound Hessians for experts
    that are rarely routed. Counts and routing weights still come from the real routing."""

    def __init__(self, stats: ExpertStats, where: str, experts: nn.Module, router_probs):
        super().__init__(stats, where)
        self.experts, self.router_probs = experts, router_probs
        self.probs: torch.Tensor | None = None  # [T, E], set by the router hook

    def router_hook(self, _module, _args, output) -> None:
        self.probs = self.router_probs(output[0])

    def __call__(self, e, x, h, tok, weights) -> None:
        check_finite(x, f"{self.where} expert {e}")
        self.stats.count[e] += x.shape[0]
        self.stats.weight_sum[e] += weights.float().sum()

    def experts_hook(self, module, args, _output) -> None:
        hidden = args[0].float()  # [T, H]
        p = self.probs  # [T, E]
        s = self.stats
        for e in range(module.num_experts):
            w_gu, _ = module.expert_weights(e)
            h = module.apply_gate(hidden @ w_gu.float().T)
            pe = p[:, e : e + 1]
            s.h_in[e] += ((hidden * pe).T @ hidden).to(s.h_in.device)
            s.h_mid[e] += ((h * pe).T @ h).to(s.h_mid.device)
            s.mass[e] += pe.sum()


class LinearHessian:
    """Forward hook for an nn.Linear (registered by whoever feeds it): accumulates X^T X of its input."""

    def __init__(self, linear: nn.Linear, where: str, device: torch.device | None = None):
        """The Hessian on `device` (default: the linear's)."""
        self.h = torch.zeros(linear.in_features, linear.in_features, device=device or linear.weight.device)
        self.n = 0
        self.where = where

    def __call__(self, _module, args, _output) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        check_finite(x, self.where)
        self.h += (x.T @ x).to(self.h.device)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.h / max(self.n, 1)
