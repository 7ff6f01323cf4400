"""From measurements to a plan: the multiple-choice knapsack over (expert, format) under the byte budget.

Objectives (cost[i, f] of giving expert i format f; all minimise the summed cost):
  global     eps^2[i, f] * s_l / tokens, s_l the loss sensitivity of i's layer (calibration/sensitivity.py): the
             loss increase the format adds to second order, comparable across layers, under one budget for all
             layers (ours); with layer_weights "output_energy" (or no sensitivity), eps^2[i, f] / (block output
             energy of i's layer) instead.
  per_layer  MC-MoE: phi^a * w^b * eps^a (a=1, b=1.5), each layer held to its share of the budget.
  frequency  phi_i * (mean relative error of format f over all experts): importance from frequency only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from .allocation.budget import parse_budget
from .allocation.lp import InfeasibleBudget, mcmoe_cost, solve_allocation
from .analysis.importance import mcmoe_weights
from .arch.view import MoEBlock
from .quantize.ternary import ternary_grid
from .config.schema import Recipe
from .io.accounting import expert_matrix_bytes, predict_bytes, projection_bytes
from .measure import BlockMeasurement
from .plan import Plan, join_formats
from .targets import Target, TargetError, row_widths, target


def ternary_experts(blocks: list[MoEBlock], group_size: int, tgt: Target | None = None) -> dict[str, list[bool]]:
    """Experts whose weights are already ternary (a MoTE checkpoint): they keep their values, losslessly, in the
    target's ternary format whatever the plan, and the budget applies to the rest; ternary experts `tgt` cannot keep
    exactly are refused (Target.check_ternary). Meta-device models have none."""
    out = {}
    for b in blocks:
        if b.gate_up().device.type == "meta":
            out[b.name] = [False] * b.num_experts
            continue
        (v_gu, s_gu), (v_d, s_d) = ternary_grid(b.gate_up(), group_size), ternary_grid(b.down(), group_size)
        values, scales = (v_gu & v_d).tolist(), (s_gu & s_d).tolist()
        if tgt is not None:
            tgt.check_ternary(b, values, scales)
        out[b.name] = [v and s for v, s in zip(values, scales)]
    return out


class TernaryScan:
    """`on_layer` callback of `layerwise` recording which experts of the layer are already ternary (on a streamed
    model the weights exist only while their layer is resident), then calling `inner` (e.g. MeasurePass). With `tgt`,
    ternary experts it cannot keep exactly are refused when their layer is reached, before it is measured."""

    def __init__(self, blocks: list[MoEBlock], group_size: int, inner=None, tgt: Target | None = None):
        self.blocks, self.group_size, self.inner, self.target = blocks, group_size, inner, tgt
        self.flags: dict[str, list[bool]] = {}

    def __call__(self, i: int, layer: nn.Module, inputs):
        self.flags.update(ternary_experts([b for b in self.blocks if b.layer_idx == i], self.group_size, self.target))
        return self.inner(i, layer, inputs) if self.inner is not None else None


def candidate_formats(allowed: list[str], ternary: dict[str, list[bool]], keep_as: str = "ternary") -> list[str]:
    """The allowed formats, plus `keep_as` (the target's ternary format) when some experts are already ternary."""
    has_ternary = any(any(flags) for flags in ternary.values())
    return list(allowed) + ([keep_as] if has_ternary and keep_as not in allowed else [])


def expert_weight_count(blocks: list[MoEBlock]) -> int:
    return sum(b.gate_up().numel() + b.down().numel() for b in blocks)


def costs(measurements: list[BlockMeasurement], objective: str, sensitivity: torch.Tensor | None = None,
          field: str = "eps_sq") -> np.ndarray:  # [N, F] (or [N, F, 2] for field eps_proj)
    """`sensitivity` [layers]: each decoder layer's loss sensitivity, for the global objective (None: output energy).
    `field`: the error table, eps_sq (the expert in f) or eps_proj (each projection in f alone; global only)."""
    eps = [getattr(m, field) for m in measurements]
    if objective == "global" and sensitivity is not None:
        return torch.cat([e.double() * float(sensitivity[m.layer_idx]) / max(m.total_tokens, 1)
                          for e, m in zip(eps, measurements)]).numpy()
    rel = [e / max(m.out_energy, 1e-30) for e, m in zip(eps, measurements)]  # [E, F] per block
    if objective == "global":
        return torch.cat(rel).double().numpy()
    if objective == "frequency":
        mean_f = torch.cat(rel).double().mean(dim=0)  # [F]
        phi = torch.cat([mcmoe_weights(m.count, m.weight_sum, m.total_tokens)[0] for m in measurements]).double()
        return (phi[:, None] * mean_f[None]).numpy()
    if objective == "per_layer":
        phi, w = zip(*(mcmoe_weights(m.count, m.weight_sum, m.total_tokens) for m in measurements))
        eps = torch.cat(rel).double().sqrt().numpy()
        return mcmoe_cost(torch.cat(phi).double().numpy(), torch.cat(w).double().numpy(), eps)
    raise ValueError(f"unknown objective {objective!r}")


def plan_budget(recipe: Recipe, model: nn.Module, blocks: list[MoEBlock], dense: dict[str, nn.Linear],
                measurements: list[BlockMeasurement], dtype: torch.dtype,
                ternary: dict[str, list[bool]] | None = None, sensitivity: torch.Tensor | None = None) -> Plan:
    """`ternary`: the experts already ternary (TernaryScan's flags); None: read off the blocks' weights.
    `sensitivity`: the layers' loss sensitivity, weighting the global objective (None: output energy)."""
    a, q = recipe.allocation, recipe.quantization
    tgt = target(a.target)
    ternary = ternary_experts(blocks, q.group_size, tgt) if ternary is None else ternary
    pinned = np.array([t for b in blocks for t in ternary[b.name]], dtype=bool)  # [N]
    formats = list(measurements[0].formats)  # what pass 1 measured: candidate_formats(...)
    base = Plan.uniform({b.name: b.num_experts for b in blocks}, "drop",
                        tgt.dense_entries(dense, q.dense_bits_or_bits),
                        group_size=q.group_size, sym=q.sym, scale_dtype=q.scale_dtype)
    fixed = sum(predict_bytes(model, blocks, dense, base, dtype).values())  # everything but the routed experts
    budget = parse_budget(a.budget)
    n_weights = expert_weight_count(blocks) if a.scope == "experts" else sum(p.numel() for p in model.parameters())
    budget_bytes = budget.resolve(n_weights)
    capacity = budget_bytes - (fixed if a.scope == "model" else 0)
    nbytes = np.array([[expert_matrix_bytes(b, f, q.group_size, q.sym, strict=False) for f in formats]
                       for b in blocks for _ in range(b.num_experts)], dtype=np.int64)
    cost = costs(measurements, a.objective, sensitivity)
    cost_proj = costs(measurements, a.objective, sensitivity, "eps_proj") if tgt.per_projection else None
    if pinned.any() and tgt.ternary_format not in formats:  # flags of a measurement cache entry older than the check
        raise TargetError(f"--target {a.target}: pass 1's measurements (from the measurement cache) lack "
                          f"{tgt.ternary_format}, the format this model's ternary experts keep; run again with "
                          "--no-measurement-cache")
    if pinned.any():  # already-ternary experts: the target's ternary format is their only (and lossless) choice
        for c in (cost, cost_proj):  # (ternary_experts checked that the target holds them exactly)
            if c is not None:
                c[pinned] = np.inf
                c[pinned, formats.index(tgt.ternary_format)] = 0.0
    groups = TargetGroups(tgt, blocks, formats, q.group_size, q.sym)
    item_cost, item_bytes = cost, nbytes  # the LP's items: experts, or the target's groups of them
    if tgt.unit != "expert":
        item_cost, item_bytes = groups.costs(cost, cost_proj), groups.nbytes()
    allowed_bytes = np.where(np.isfinite(item_cost), item_bytes, np.iinfo(np.int64).max)
    smallest = int(allowed_bytes.min(axis=1).sum()) + (fixed if a.scope == "model" else 0)
    if smallest > budget_bytes:
        misfit = tgt.misfits(formats, blocks)
        fix = ("plan for a target these widths fit (--target native takes any width)" if misfit else
               "allow smaller formats (--formats)")
        raise InfeasibleBudget(smallest, budget_bytes, detail=(
            f"scope {a.scope!r}, target {a.target}, formats {formats}; " + (f"{misfit}; " if misfit else "")
            + f"raise --budget to at least {smallest} bytes or {fix}"))
    if a.objective == "per_layer":  # MC-MoE: each layer held to its share of the budget, by weight count
        alloc = solve_per_layer(cost, nbytes, capacity, blocks, a.solver, a.rel_gap)
    else:
        alloc = solve_allocation(item_cost, item_bytes, capacity, solver=a.solver, rel_gap=a.rel_gap)
    experts = groups.entries(alloc.choice)
    return Plan(experts, dict(base.dense), q.group_size, q.sym, scale_dtype=q.scale_dtype, budget_bytes=budget_bytes,
                scope=a.scope, target=a.target,
                allocation={"objective": a.objective, "eps_quantizer": a.eps_quantizer,
                            "layer_weights": layer_weights(a.objective, sensitivity), "solver": alloc.solver,
                            "seconds": round(alloc.seconds, 3), "gap": alloc.gap, "status": alloc.status, "cost": alloc.objective,
                            "expert_bytes": alloc.total_bytes, "capacity": int(capacity), "fixed_bytes": int(fixed)},
                analysis=analysis_table(measurements, blocks, nbytes, formats))


class TargetGroups:
    """The LP's items under a target (targets.py): experts (native), a layer's experts per projection (gguf: one ggml
    type per stacked tensor) or a layer's experts (vllm: one scheme per layer). A group's cost of a format is the sum
    of its members' measured costs (the LP's additivity across experts, extended across projections), its bytes the
    members' exact bytes; a format a member's matrix cannot take is not a choice of its group."""

    def __init__(self, target, blocks: list[MoEBlock], formats: list[str], group_size: int, sym: bool):
        self.target, self.blocks, self.formats, self.gs, self.sym = target, blocks, formats, group_size, sym
        self.bounds = np.cumsum([0] + [b.num_experts for b in blocks])

    def _per_block(self, per_expert: np.ndarray) -> np.ndarray:  # [N, ...] -> [blocks, ...], summed over experts
        return np.add.reduceat(per_expert, self.bounds[:-1], axis=0)

    def costs(self, cost: np.ndarray, cost_proj: np.ndarray | None) -> np.ndarray:
        if self.target.unit == "layer":
            grouped = self._per_block(cost)                                    # [blocks, F]
        else:
            grouped = self._per_block(cost_proj).transpose(0, 2, 1).reshape(-1, len(self.formats))  # [blocks x 2, F]
        return np.where(self._fits(), grouped, np.inf)

    def _fits(self) -> np.ndarray:
        """[items, F]: the formats the target holds for the item's matrices (targets.Target.fits)."""
        rows = []
        for b in self.blocks:
            per = np.array([[self.target.fits(f, w) for f in self.formats]
                            for w in row_widths(b)])  # [2, F]
            rows += [per.all(0)] if self.target.unit == "layer" else list(per)
        return np.array(rows)

    def nbytes(self) -> np.ndarray:
        rows = []
        for b in self.blocks:
            per = np.array([projection_bytes(b, f, self.gs, self.sym, strict=False) for f in self.formats],
                           dtype=np.int64)  # [F, 2]
            rows += [per.sum(1) * b.num_experts] if self.target.unit == "layer" else list(per.T * b.num_experts)
        return np.array(rows, dtype=np.int64)

    def entries(self, choice: np.ndarray) -> dict[str, list[str]]:
        """The LP's choice [items] -> each block's plan entries."""
        out = {}
        for k, b in enumerate(self.blocks):
            if self.target.unit == "expert":
                picked = [self.formats[c] for c in choice[self.bounds[k]:self.bounds[k + 1]]]
            elif self.target.unit == "layer":
                picked = [self.formats[choice[k]]] * b.num_experts
            else:
                picked = [join_formats(self.formats[choice[2 * k]], self.formats[choice[2 * k + 1]])] * b.num_experts
            out[b.name] = picked
        return out


def layer_weights(objective: str, sensitivity: torch.Tensor | None) -> str | list[float] | None:
    """What the plan records: the sensitivity per layer the global LP weighted eps by, or "output_energy"."""
    if objective != "global":
        return None
    return "output_energy" if sensitivity is None else [float(f"{float(v):.4g}") for v in sensitivity]


def solve_per_layer(cost: np.ndarray, nbytes: np.ndarray, capacity: int, blocks: list[MoEBlock], solver: str,
                    rel_gap: float):
    """Independent knapsacks, one per layer (the per-layer caps separate the problem exactly)."""
    share = np.array([b.gate_up().numel() + b.down().numel() for b in blocks], dtype=np.float64)
    caps = np.floor(capacity * share / share.sum()).astype(np.int64)
    bounds = np.cumsum([0] + [b.num_experts for b in blocks])
    parts = [solve_allocation(cost[lo:hi], nbytes[lo:hi], int(cap), solver=solver, rel_gap=rel_gap)
             for lo, hi, cap in zip(bounds[:-1], bounds[1:], caps)]
    return dataclasses.replace(
        parts[0], choice=np.concatenate([p.choice for p in parts]), objective=float(sum(p.objective for p in parts)),
        total_bytes=int(sum(p.total_bytes for p in parts)), seconds=float(sum(p.seconds for p in parts)),
        gap=float(max(p.gap for p in parts)), solver="+".join(sorted({p.solver for p in parts})),
        status="optimal" if all(p.status.startswith("optimal") for p in parts) else "mixed")


def analysis_table(measurements: list[BlockMeasurement], blocks: list[MoEBlock], nbytes: np.ndarray,
                   formats: list[str]) -> dict:
    rows, k = {}, 0
    for m, b in zip(measurements, blocks):
        phi, w = mcmoe_weights(m.count, m.weight_sum, m.total_tokens)
        rel = m.eps_sq / max(m.out_energy, 1e-30)
        rows[m.name] = [{"frequency": round(float(phi[e]), 6), "routing_weight": round(float(w[e]), 6),
                         "rel_output_error": {f: float(rel[e, j]) for j, f in enumerate(formats)},
                         "hessian_error": {f: float(m.hess_err[e, j]) for j, f in enumerate(formats)},
                         "bytes": {f: int(nbytes[k + e, j]) for j, f in enumerate(formats)}}
                        for e in range(b.num_experts)]
        k += b.num_experts
    return rows
