"""The plan: reused from --plan, uniform, or solved by the budget LP over pass 1's measurements (each expert's output
error in every candidate format, on full-precision inputs) weighted by each layer's loss sensitivity."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch import nn

from ..assets import MEASUREMENTS_DIR
from ..calibration.images import ImageFeed, blockwise
from ..calibration.layerwise import Resident, in_memory, layerwise
from ..config import Recipe
from ..device import hessian_device
from ..io.measure_cache import MeasurementCache
from ..io.streaming import StreamedModel
from ..measure import BlockMeasurement, MeasurePass
from ..plan import Plan
from ..plan_check import check_plan
from ..planning import TernaryScan, candidate_formats, plan_budget, ternary_experts
from ..targets import target
from ..weight_measure import weight_measurements
from .driver import LocalDriver
from .inputs import model_dir_of


def make_plan(recipe: Recipe, model: nn.Module, blocks, dense, windows: torch.Tensor | None,
              dtype: torch.dtype, stream: StreamedModel | None = None, log=print, feed: ImageFeed | None = None,
              driver=None) -> Plan:
    """A plan from --plan, from the budget LP over pass-1 measurements (on the calibration windows, or on
    `feed`'s images for MLPMoE blocks; data-free weight errors when there is neither: see weight_measure.py), or
    uniform. With `stream`, `model` is that streamed model's (meta device): what needs weights reads them one
    decoder layer at a time. Pass 1's measurements are reused from the measurement cache when its inputs are
    unchanged (io/measure_cache.py). `driver` (pipeline/driver.py; default: this process alone): what runs where;
    with ranks, rank 0 decides the plan and every rank gets it."""
    q, a = recipe.quantization, recipe.allocation
    driver = driver or LocalDriver.for_recipe(recipe)
    resident = stream.resident if stream is not None else in_memory
    if a.plan is not None:
        # made for this model, formats it can hold
        return driver.lead(lambda: check_plan(Plan.load(a.plan), blocks, dense, a.plan), asdict, _plan)
    if a.budget is None:
        t = target(a.target)
        plan = Plan.uniform({b.name: b.num_experts for b in blocks}, q.expert_format,
                            t.dense_entries(dense, q.dense_bits_or_bits), group_size=q.group_size, sym=q.sym,
                            scale_dtype=q.scale_dtype, target=a.target)
        if a.target != "native":  # the target's format of --bits for each matrix width
            plan.experts = t.uniform_entries(blocks, q.bits)
        for name, flags in pinned_ternary(model, blocks, q.group_size, resident).items():  # MoTE experts stay ternary
            plan.experts[name] = ["ternary" if t else f for t, f in zip(flags, plan.experts[name])]
        return plan
    if windows is None and feed is None:
        formats = candidate_formats(a.formats, ternary_experts(blocks, q.group_size))
        plan = plan_budget(recipe, model, blocks, dense,
                           weight_measurements(blocks, formats, q.group_size, q.sym, q.scale_dtype), dtype)
        plan.allocation["measurements"] = "data-free weight errors, uniform routing"
        return plan
    cache = driver.cache(MeasurementCache(MEASUREMENTS_DIR if a.reuse_measurements else None))
    with driver.stage("pass 1"):
        measurements, ternary = cache.get_or_measure(
            model_dir_of(recipe), recipe, feed.pixels if feed is not None else windows,
            lambda journal: measure(recipe, model, blocks, windows, resident, journal, feed, driver), log)
    sensitivity = None
    if a.objective == "global" and a.layer_weights == "sensitivity" and feed is not None:
        log("layer weights: output energy (the loss sensitivity needs a language-model loss, which images do not give)")
    elif a.objective == "global" and a.layer_weights == "sensitivity":
        head = stream.head if stream is not None else nullcontext
        some = windows[:a.sensitivity_samples]
        sensitivity = cache.get_or_compute_sensitivity(
            model_dir_of(recipe), some, lambda: driver.sensitivity(model, some, resident, head), log)

    def solve() -> Plan:
        plan = plan_budget(recipe, model, blocks, dense, measurements, dtype, ternary, sensitivity)
        plan.allocation["measurements"] = f"pass 1 {cache.outcome}"
        return plan

    return driver.lead(solve, asdict, _plan)


def _plan(data: dict) -> Plan:
    return Plan(**data)


def measure(recipe: Recipe, model: nn.Module, blocks, windows: torch.Tensor | None, resident: Resident = in_memory,
            journal=None, feed: ImageFeed | None = None, driver=None
            ) -> tuple[list[BlockMeasurement], dict[str, list[bool]]]:
    """Pass 1 over the candidate formats, and which experts are already ternary. A streamed model's weights are
    read only during the pass, so its ternary experts are found on the way; should there be some (a MoTE
    checkpoint) while ternary was not an allowed format, the pass runs again with ternary as a candidate.
    `journal` (MeasureJournal): layers measured by an interrupted run are read from it, new ones written to it.
    With `feed`, the MLPMoE blocks are measured on its images instead of the windows."""
    q, a = recipe.quantization, recipe.allocation
    driver = driver or LocalDriver.for_recipe(recipe)
    ternary = ternary_experts(blocks, q.group_size)  # none on the meta device
    while True:
        formats = candidate_formats(a.formats, ternary)
        scan = TernaryScan(blocks, q.group_size, MeasurePass(
            blocks, formats, q.group_size, q.sym, a.eps_quantizer, q.gptq_options, journal,
            per_projection=target(a.target).per_projection, scale_dtype=q.scale_dtype,
            hessian_device=hessian_device(recipe.execution.hessians), driver=driver))
        if feed is not None:
            blockwise(blocks, feed, scan, desc="measure")
        else:
            layerwise(model, driver.windows(windows), scan, desc="measure", resident=resident, device=driver.device)
        if candidate_formats(a.formats, scan.flags) == formats:
            return scan.inner.results, scan.flags
        ternary = scan.flags


def pinned_ternary(model: nn.Module, blocks, group_size: int, resident: Resident = in_memory) -> dict[str, list[bool]]:
    """The experts already ternary; on a streamed model, read one layer at a time."""
    if resident is in_memory:
        return ternary_experts(blocks, group_size)
    scan = TernaryScan(blocks, group_size)
    layerwise(model, None, scan, desc="ternary experts", resident=resident)
    return scan.flags


def plan_summary(plan: Plan) -> str:
    lines = [f"{name}: " + " ".join(f"{f} x{fmts.count(f)}" for f in sorted(set(fmts), key=fmts.index))
             for name, fmts in plan.experts.items()]
    alloc = plan.allocation
    if {"objective", "solver", "seconds", "gap", "status"} <= alloc.keys():
        lines.append(f"allocation: {alloc['objective']} via {alloc['solver']} in {alloc['seconds']} s, "
                     f"gap {alloc['gap']:.2g}, status {alloc['status']}")
    lines.append(f"formats {plan.format_counts()}; {plan.budget_line()}")
    return "\n".join(lines)


def scope_bytes(plan: Plan, predicted: dict[str, int], blocks) -> int:
    """The bytes the budget counts: everything (scope model) or the routed experts (scope experts)."""
    if plan.scope == "model":
        return sum(predicted.values())
    return sum(predicted[f"{b.name}.{e}"] for b in blocks for e in range(b.num_experts))
