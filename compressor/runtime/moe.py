"""MLPMoE: a routed mixture of experts in place of a two-layer MLP (Linear -> activation -> Linear), wherever it
sits in a model: a CLIP vision tower's MLPs, a LLaVA projector. It is what CuMo up-cycles outside the language
model, where no transformers MoE architecture fits, so it is our own module: config.json lists the replaced
modules under `moe_modules` ({module name: {"experts": E, "top_k": k}}) and io/ rebuilds them from the dense
architecture before it loads the weights (no remote code, no pickle).

Storage is the project's canonical experts layout (runtime/experts.py, DenseExperts with nn.Parameters):
    experts.gate_up [E, I, H_in]  fc1 of each expert (a plain MLP has no gate rows)
    experts.down    [E, H_out, I] fc2
    experts.gate_up_bias [E, I], experts.down_bias [E, H_out]  when the MLP has biases
    experts.apply_gate = the MLP's own activation module: act(x), not act(gate) * up
    router.weight   [E, H_in], no bias
Routing as Mixtral: softmax over the experts, top-k, the k weights renormalised to sum to 1, so experts that
are copies of the MLP give the MLP's output (to float rounding). The compressor swaps `experts` for
PackedExperts like any other experts module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .experts import DenseExperts

CONFIG_KEY = "moe_modules"  # config.json: {module name: {"experts": E, "top_k": k}}


@dataclass
class TwoLayerMLP:
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear


def two_layer_mlp(module: nn.Module) -> TwoLayerMLP | None:
    """The parts of a module built as Linear -> activation -> Linear (CLIP's fc1 / activation_fn / fc2, LLaVA's
    linear_1 / act / linear_2), else None: exactly two nn.Linear children (in registration order), fc1's output
    width equal to fc2's input, and one more child without parameters or buffers (the activation). Its forward is
    not read here; up-cycling checks the result against the module itself (upcycle/modules.py)."""
    children = list(module.children())
    linears = [c for c in children if isinstance(c, nn.Linear)]
    others = [c for c in children if not isinstance(c, nn.Linear)]
    if len(linears) != 2 or len(others) != 1:
        return None
    act = others[0]
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False), *act.parameters(), *act.buffers()]
    fc1, fc2 = linears
    if own or fc1.out_features != fc2.in_features:
        return None
    return TwoLayerMLP(fc1, act, fc2)


class MLPMoE(nn.Module):
    """forward(x [..., H_in]) -> [..., H_out], as the two-layer MLP it replaces."""

    def __init__(self, num_experts: int, top_k: int, in_features: int, hidden: int, out_features: int,
                 act: nn.Module, bias: tuple[bool, bool] = (True, True), dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))

        E = num_experts
        self.router = nn.Linear(in_features, E, bias=False, dtype=dtype, device=device)
        biases = (zeros(E, hidden) if bias[0] else None, zeros(E, out_features) if bias[1] else None)
        self.experts = DenseExperts(zeros(E, hidden, in_features), zeros(E, out_features, hidden), act, biases)

    @classmethod
    def like(cls, mlp: TwoLayerMLP, num_experts: int, top_k: int) -> "MLPMoE":
        """Zero weights with the shapes, dtype, device (meta too) and activation of `mlp`."""
        w = mlp.fc1.weight
        return cls(num_experts, top_k, mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features, mlp.act,
                   (mlp.fc1.bias is not None, mlp.fc2.bias is not None), dtype=w.dtype, device=w.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])  # [T, H_in]
        probs = self.router(x).float().softmax(dim=-1)  # [T, E]
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        y = self.experts(x, index, weights.to(x.dtype))  # [T, H_out]
        return y.reshape(*hidden.shape[:-1], y.shape[-1])


def config_entry(model: nn.Module) -> dict[str, dict[str, int]]:
    """The `moe_modules` entry of config.json for the MLPMoE blocks of `model`."""
    return {n: {"experts": m.num_experts, "top_k": m.top_k} for n, m in model.named_modules() if isinstance(m, MLPMoE)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
