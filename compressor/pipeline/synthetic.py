"""Planning a model too large to load here, from its config.json alone: the architecture on the meta device and
synthetic statistics give a real plan and an exact byte count (a planning check, never a quality claim)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import prune
from ..arch.view import dense_linears, find_moe_blocks
from ..config import Recipe
from ..io import checkpoint as ckpt
from ..io.accounting import predict_bytes
from ..io.models import check_supported, read_config, read_config_file
from ..io.outputs import write_plan_only
from ..measure import synthetic_measurements
from ..plan import Plan
from ..plan_check import made_for
from ..planning import plan_budget
from ..targets import target
from .inputs import DTYPES, model_dir_of
from .pass1 import plan_summary, scope_bytes


def meta_model(config: dict) -> nn.Module:
    """The architecture of a config.json on the meta device: shapes without weights."""
    from transformers import AutoConfig

    config = {k: v for k, v in config.items() if k != "quantization_config"}  # e.g. DeepSeek-V3's FP8 block format
    check_supported(config)
    return ckpt.skeleton(AutoConfig.for_model(config.pop("model_type"), **config))


def plan_synthetic(recipe: Recipe, config: dict, seed: int = 0) -> Plan:
    """A real plan and byte count for a model too large to load here: the architecture on the meta
    device, synthetic statistics (compressor.measure.synthetic_measurements). A planning check only."""
    recipe = target(recipe.allocation.target).resolve(recipe)
    model = meta_model(config)
    blocks = find_moe_blocks(model)
    target(recipe.allocation.target).check_blocks(blocks)
    if recipe.pruning.target is not None:
        prune.check_prunable(blocks, recipe.pruning.target, recipe.pruning.protect)  # before the long work
    dense = dense_linears(model, blocks)
    dtype = DTYPES[recipe.dtype]
    measurements = synthetic_measurements(blocks, list(recipe.allocation.formats), seed)
    plan = plan_budget(recipe, model, blocks, dense, measurements, dtype)
    predicted = predict_bytes(model, blocks, dense, plan, dtype)
    plan.predicted_bytes, plan.made_for = sum(predicted.values()), made_for(blocks, dense)
    plan.allocation["budget_counts"] = scope_bytes(plan, predicted, blocks)
    return plan


def dry_run_synthetic(recipe: Recipe, log=print, overwrite: bool = False) -> Plan:
    """`compress MODEL --dry-run --synthetic-stats`: MODEL is a config.json or a directory holding one."""
    path = model_dir_of(recipe)
    config = read_config_file(path) if path.is_file() else read_config(path)
    if recipe.output:
        ckpt.check_output(Path(recipe.output), path, overwrite, log)  # the rules of a real output
    plan = plan_synthetic(recipe, config)
    log(plan_summary(plan))
    if recipe.output:
        write_plan_only(plan, Path(recipe.output), path, overwrite, log)
    return plan
