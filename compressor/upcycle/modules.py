"""`upcycle --modules` for models of any architecture: two-layer MLPs (Linear -> activation -> Linear) chosen by a
regex over module names become MLPMoE blocks (runtime/moe.py), in place, wherever they sit: a CLIP vision
encoder's MLPs, a LLaVA projector. CuMo co-up-cycling: every expert is a copy of the MLP (weights and biases)
and the router starts at N(0, router_std), so at step 0 each block computes its MLP (to float rounding).

A Llama language model keeps its own path (build.py: Mixtral / Qwen2-MoE layouts, ternary, shared expert).
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..runtime.moe import MLPMoE, TwoLayerMLP, replace_module, two_layer_mlp
from .build import DEFAULT_TOP_K, UpcycleError


def mlp_modules(model: nn.Module) -> dict[str, TwoLayerMLP]:
    """Every two-layer MLP of `model`, by module name, in module order."""
    return {n: mlp for n, m in model.named_modules() if n and (mlp := two_layer_mlp(m)) is not None}


def select_modules(model: nn.Module, modules: str | None) -> dict[str, TwoLayerMLP]:
    """The two-layer MLPs whose full dotted name matches `modules` (re.search); all of them when None."""
    found = mlp_modules(model)
    if not found:
        raise UpcycleError(f"{type(model).__name__} has no two-layer MLP (Linear -> activation -> Linear) to up-cycle")
    if modules is None:
        return found
    try:
        pattern = re.compile(modules)
    except re.error as err:
        raise UpcycleError(f"--modules {modules!r} is not a regular expression: {err}") from None
    chosen = {n: mlp for n, mlp in found.items() if pattern.search(n)}
    if not chosen:
        raise UpcycleError(f"--modules {modules!r} matches no two-layer MLP of {type(model).__name__}; "
                           f"its MLP modules are: {', '.join(found)}")
    return chosen


@torch.no_grad()
def upcycle_modules(model: nn.Module, experts: int = 8, top_k: int = DEFAULT_TOP_K, modules: str | None = None,
                    router_std: float = 0.02, seed: int = 0) -> list[str]:
    """In place: each selected MLP becomes an MLPMoE of `experts` copies of it. Returns the replaced names.
    Each block is checked against its MLP on a random probe: a module that has the parts of a two-layer MLP but
    computes something else (another order, a second activation in its forward) is refused, not mis-copied."""
    if not 1 <= top_k <= experts:
        raise UpcycleError(f"top_k must be in [1, experts={experts}], got {top_k}")
    chosen = select_modules(model, modules)
    gen, probe_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    for name, mlp in chosen.items():
        moe = MLPMoE.like(mlp, experts, top_k)
        ex = moe.experts
        ex.gate_up.copy_(mlp.fc1.weight.expand_as(ex.gate_up))  # [E, I, H_in]
        ex.down.copy_(mlp.fc2.weight.expand_as(ex.down))  # [E, H_out, I]
        for bias, linear in ((ex.gate_up_bias, mlp.fc1), (ex.down_bias, mlp.fc2)):
            if bias is not None:
                bias.copy_(linear.bias.expand_as(bias))
        moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=gen) * router_std)
        _check_same_output(name, model.get_submodule(name), moe, probe_gen)
        replace_module(model, name, moe)
    return list(chosen)


def _check_same_output(name: str, dense: nn.Module, moe: MLPMoE, gen: torch.Generator) -> None:
    """fp32 copies on a random probe: equal to float rounding, whatever the model's dtype."""
    dense, moe = copy.deepcopy(dense).float(), copy.deepcopy(moe).float()
    x = torch.randn(16, moe.router.in_features, generator=gen)
    try:
        want = dense(x)
    except Exception as err:  # e.g. a forward taking more than one tensor
        raise UpcycleError(f"{name} ({type(dense).__name__}) cannot be called on one tensor: {err}") from None
    got = moe(x)
    if want.shape != got.shape or float((got - want).abs().max()) > 1e-5 * (float(want.abs().max()) + 1):
        raise UpcycleError(f"{name} ({type(dense).__name__}) has two Linear layers and an activation but does not "
                           "compute Linear -> activation -> Linear; it cannot be up-cycled")
