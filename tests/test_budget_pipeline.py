"""`compress --budget`: the plan fits the budget to the byte, the written checkpoint is the size the plan
predicts, infeasible budgets fail before anything is written, per-layer caps hold, plans round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.allocation.lp import InfeasibleBudget
from compressor.io.accounting import expert_matrix_bytes
from compressor.io.models import load_model
from compressor.arch.view import find_moe_blocks
from tiny import budget_recipe as recipe, file_tensor_bytes, save_tiny

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe"))




def test_model_budget_fits_to_the_byte(src, tmp_path):
    uniform4 = api.compress(recipe(src, tmp_path / "u4", **{"quantization.bits": 4}), **QUIET)
    budget = file_tensor_bytes(uniform4) - 4000  # some experts must go below int4, not all
    out = api.compress(recipe(src, tmp_path / "b", **{"allocation.budget": f"{budget}B"}), **QUIET)
    plan = json.loads((out / "plan.json").read_text())
    assert file_tensor_bytes(out) == plan["predicted_bytes"] <= budget == plan["budget_bytes"]
    assert plan["allocation"]["status"].startswith("optimal")
    assert len({f for fs in plan["experts"].values() for f in fs}) > 1, "a mixed plan, not uniform"


def test_experts_scope_bits_budget(src, tmp_path):
    out = api.compress(recipe(src, tmp_path / "e", **{"allocation.budget": "2.5bits", "allocation.scope": "experts"}),
                       dry_run=True, **QUIET)
    plan = json.loads((out / "plan.json").read_text())
    blocks = find_moe_blocks(load_model(src))
    n_weights = sum(b.gate_up().numel() + b.down().numel() for b in blocks)
    used = sum(expert_matrix_bytes(b, f, 16, False) for b in blocks for f in plan["experts"][b.name])
    assert plan["budget_bytes"] == int(2.5 * n_weights / 8)
    assert used <= plan["budget_bytes"]
    assert not (out / "model.safetensors").exists(), "dry run writes the plan only"


def test_infeasible_budget_names_smallest_size_and_writes_nothing(src, tmp_path):
    r = recipe(src, tmp_path / "x", **{"allocation.budget": "1KB", "allocation.formats": ["int4", "int2"]})
    with pytest.raises(InfeasibleBudget, match=r"smallest size reachable .* is \d+ bytes") as err:
        api.compress(r, **QUIET)
    assert err.value.min_bytes > 1000
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_per_layer_objective_respects_layer_shares(src, tmp_path):
    # int2 at group 16 costs 4 bits per weight (scales and zeros included)
    r = recipe(src, tmp_path / "p", **{"allocation.budget": "5bits", "allocation.scope": "experts",
                                          "allocation.objective": "per_layer",
                                          "allocation.formats": ["int8", "int4", "int3", "int2"]})
    plan = json.loads((api.compress(r, dry_run=True, **QUIET) / "plan.json").read_text())
    blocks = find_moe_blocks(load_model(src))
    cap = plan["allocation"]["capacity"]
    total_w = sum(b.gate_up().numel() + b.down().numel() for b in blocks)
    for b in blocks:
        share = cap * (b.gate_up().numel() + b.down().numel()) // total_w
        assert sum(expert_matrix_bytes(b, f, 16, False) for f in plan["experts"][b.name]) <= share


def test_plan_file_is_reused(src, tmp_path):
    r = recipe(src, tmp_path / "d", **{"allocation.budget": "3bits", "allocation.scope": "experts"})
    first = json.loads((api.compress(r, dry_run=True, **QUIET) / "plan.json").read_text())
    again = api.compress(recipe(src, tmp_path / "q", **{"allocation.plan": str(tmp_path / "d" / "plan.json")}), **QUIET)
    model = load_model(again)
    assert {b.name: b.block.experts.formats() for b in find_moe_blocks(model)} == first["experts"]


def test_a_plan_mixing_every_format_packs_writes_and_reloads(src, tmp_path):
    """Every expert format in one model, "keep" included (16-bit experts sit beside packed ones): the checkpoint is
    the predicted size, reloads with the planned formats, and the kept experts are the source's weights."""
    r = recipe(src, tmp_path / "d", **{"allocation.budget": "3bits", "allocation.scope": "experts"})
    plan = json.loads((api.compress(r, dry_run=True, **QUIET) / "plan.json").read_text())
    cycle = ["keep", "int8", "int4", "int3", "int2", "ternary"]
    plan["experts"] = {name: [cycle[(i + e) % len(cycle)] for e in range(len(fmts))]
                       for i, (name, fmts) in enumerate(plan["experts"].items())}
    plan.update(budget_bytes=None, predicted_bytes=None)
    (tmp_path / "mixed.json").write_text(json.dumps(plan))
    out = api.compress(recipe(src, tmp_path / "q", **{"allocation.plan": str(tmp_path / "mixed.json")}), **QUIET)
    assert file_tensor_bytes(out) == json.loads((out / "plan.json").read_text())["predicted_bytes"]
    source = {b.name: b for b in find_moe_blocks(load_model(src))}
    for b in find_moe_blocks(load_model(out)):
        assert b.block.experts.formats() == plan["experts"][b.name]
        for e, fmt in enumerate(plan["experts"][b.name]):
            if fmt == "keep":
                gate_up, down = b.block.experts.expert_weights(e)
                assert torch.equal(gate_up, source[b.name].gate_up()[e].float())
                assert torch.equal(down, source[b.name].down()[e].float())
