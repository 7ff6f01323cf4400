"""Recipes: each validates, round-trips, and plans within its budget on the model's real config.json
(../shared/moe-configs, built on the meta device with synthetic statistics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compressor import api
from compressor.allocation.budget import parse_budget
from compressor.allocation.lp import InfeasibleBudget
from compressor.config import apply_overrides, dump_recipe, load_recipe, recipe_from_dict
from compressor.arch.view import find_moe_blocks
from compressor.io.accounting import expert_matrix_bytes

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CONFIGS = ROOT.parent / "shared" / "moe-configs"
REAL_CONFIG = {  # recipe -> the model's real config.json
    "mixtral-8x7b.yaml": "Mixtral-8x7B-v0.1.json",
    "qwen3-30b-a3b.yaml": "Qwen3-30B-A3B.json",
    "qwen1.5-moe-a2.7b.yaml": "Qwen1.5-MoE-A2.7B.json",
    "deepseek-v2-lite.yaml": "DeepSeek-V2-Lite.json",
    "olmoe-1b-7b.yaml": "OLMoE-1B-7B-0924.json",
    "gpt-oss-20b.yaml": "gpt-oss-20b.json",
}


def test_every_model_has_a_recipe():
    assert set(REAL_CONFIG) | {"default.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe.notes, "a recipe says why"
    again = recipe_from_dict(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def _expert_bytes(plan, blocks, recipe) -> int:
    q = recipe.quantization
    return sum(expert_matrix_bytes(b, f, q.group_size, q.sym) for b in blocks for f in plan.experts[b.name])


@pytest.mark.skipif(not CONFIGS.is_dir(), reason="../shared/moe-configs not present")
@pytest.mark.parametrize("recipe_name", sorted(REAL_CONFIG))
def test_recipe_plans_on_the_real_config(recipe_name):
    recipe = load_recipe(ROOT / "recipes" / recipe_name)
    config = json.loads((CONFIGS / REAL_CONFIG[recipe_name]).read_text())
    blocks = find_moe_blocks(api.meta_model(config))
    n_expert_weights = sum(b.gate_up().numel() + b.down().numel() for b in blocks)
    budget = parse_budget(recipe.allocation.budget).resolve(n_expert_weights)

    plan = api.plan_synthetic(recipe, config)  # the recipe's own budget: feasible, and within it
    assert plan.budget_bytes == budget
    assert _expert_bytes(plan, blocks, recipe) == plan.allocation["expert_bytes"] <= budget
    assert plan.allocation["gap"] <= 1e-3

    # the mission's example, 3.4 GB of expert memory: a plan within it, or the exact smallest size
    r34 = apply_overrides(recipe, {"allocation.budget": "3.4GB", "allocation.scope": "experts"})
    q = recipe.quantization
    smallest = sum(min(expert_matrix_bytes(b, f, q.group_size, q.sym) for f in recipe.allocation.formats)
                   for b in blocks for _ in range(b.num_experts))
    if smallest > 3.4e9:
        with pytest.raises(InfeasibleBudget) as err:
            api.plan_synthetic(r34, config)
        assert err.value.min_bytes == smallest
    else:
        assert _expert_bytes(api.plan_synthetic(r34, config), blocks, recipe) <= 3_400_000_000


def test_compress_flags_offer_exactly_the_schema_choices():
    """Every `compress` flag with choices offers the values its recipe field accepts (read from the schema), so a
    value the schema gains, like --method imatrix, is a flag value at once; a non-Literal field is refused."""
    import argparse

    import cli
    from compressor.config.schema import field_choices

    sub = argparse.ArgumentParser().add_subparsers()
    cli._compress_parser(sub)
    compress = sub.choices["compress"]
    with_choices = {a.dest: a.choices for a in compress._actions if a.choices}
    assert {"method", "eps_quantizer", "target", "bits", "dense_bits", "calib_mode"} <= set(with_choices)
    for dest, choices in with_choices.items():
        assert list(choices) == field_choices(cli.FLAG_FIELDS[dest]), dest
    assert "imatrix" in with_choices["method"] and "imatrix" in with_choices["eps_quantizer"]
    with pytest.raises(TypeError, match="not a Literal"):
        field_choices("calibration.samples")
