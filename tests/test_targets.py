"""`--target gguf|vllm`: plans a runtime loads as they are. The grouped LP against brute force, the written
checkpoint against the plan and against gguf-py's own dequantization, the refusals."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from compressor import api
from compressor.arch.view import find_moe_blocks
from compressor.io.accounting import projection_bytes
from compressor.io.models import load_model
from compressor.measure import synthetic_measurements
from compressor.plan import split_format
from compressor.planning import costs, plan_budget
from compressor.targets import TargetError
from tiny import budget_recipe, file_tensor_bytes, save_tiny

QUIET = dict(log=lambda *_: None)
WIDE = dict(hidden_size=256, intermediate_size=512)  # rows of whole 256-weight blocks: every ggml type fits


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("wide"), **WIDE)


def recipe(src, out, **over):
    return budget_recipe(src, out, **{"allocation.formats": ["keep"], "allocation.scope": "experts", **over})


def test_gguf_lp_is_brute_force_optimal(wide, tmp_path):
    """One type per (layer, projection): enumerate every assignment of the 4 groups and compare."""
    formats = ["q2_k", "q3_k", "q4_k", "q8_0"]
    r = api.target("gguf").resolve(recipe(wide, tmp_path / "o", **{
        "allocation.target": "gguf", "allocation.formats": formats, "allocation.budget": "3.3bits", "allocation.rel_gap": 0.0}), log=lambda *_: None)
    model = load_model(wide)
    blocks = find_moe_blocks(model)
    ms = synthetic_measurements(blocks, formats, seed=3)
    plan = plan_budget(r, model, blocks, {}, ms, torch.float16)
    per_proj = costs(ms, "global", None, "eps_proj")  # [N, F, 2], output-energy weights
    E = blocks[0].num_experts
    groups = [(k, p) for k in range(len(blocks)) for p in (0, 1)]
    best = (np.inf, None)
    for choice in itertools.product(range(len(formats)), repeat=len(groups)):
        nbytes = sum(E * projection_bytes(blocks[k], formats[c], 128, False)[p] for (k, p), c in zip(groups, choice))
        if nbytes <= plan.budget_bytes:
            cost = sum(per_proj[k * E:(k + 1) * E, c, p].sum() for (k, p), c in zip(groups, choice))
            best = min(best, (cost, choice), key=lambda x: x[0])
    got = tuple(formats.index(split_format(plan.experts[blocks[k].name][0])[p]) for k, p in groups)
    assert got == best[1]
    for b in blocks:  # one entry per layer: every expert of a layer the same
        assert len(set(plan.experts[b.name])) == 1
    assert plan.target == "gguf"


def test_gguf_budget_compress_writes_what_llama_cpp_reads(wide, tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf.constants import GGMLQuantizationType
    from compressor.quantize.ggml import GGML_TYPES

    out = api.compress(recipe(wide, tmp_path / "g", **{"allocation.target": "gguf", "allocation.budget": "4bits"}),
                       **QUIET)
    plan = json.loads((out / "plan.json").read_text())
    assert file_tensor_bytes(out) == plan["predicted_bytes"]
    assert plan["target"] == "gguf" and plan["allocation"]["expert_bytes"] <= plan["budget_bytes"]
    model = load_model(out)
    for b in find_moe_blocks(model):
        entries = set(plan["experts"][b.name])
        assert len(entries) == 1  # stacked experts: one type per projection
        for part, fmt in zip(("gate_up", "down"), split_format(entries.pop())):
            for e in range(b.num_experts):
                m = getattr(getattr(b.block.experts, str(e)), part)
                assert m.spec.format == fmt
                if fmt in GGML_TYPES:
                    ref = gguf.quants.dequantize(m.qweight.numpy(), GGMLQuantizationType[GGML_TYPES[fmt].gguf])
                    assert np.array_equal(ref, m.dequantized().numpy())
    ids = torch.randint(0, 300, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("bits, expect", [(4, "q5_0"), (6, "q8_0")])  # llama-quantize's substitutes for q4_k, q6_k
def test_gguf_uniform_bits_fall_back_where_rows_are_not_256_blocks(tmp_path, bits, expect):
    src = save_tiny("mixtral", tmp_path / "narrow")  # hidden 64, intermediate 96: 32-weight blocks only
    out = api.compress(recipe(src, tmp_path / "u", **{"allocation.target": "gguf", "quantization.bits": bits,
                                                      "quantization.method": "rtn"}), **QUIET)
    plan = json.loads((out / "plan.json").read_text())
    assert {f for fs in plan["experts"].values() for f in fs} == {expect}
    assert file_tensor_bytes(out) == plan["predicted_bytes"]


def test_vllm_target_one_symmetric_scheme_per_layer(wide, tmp_path):
    out = api.compress(recipe(wide, tmp_path / "v", **{"allocation.target": "vllm", "allocation.budget": "6.2bits"}),
                       dry_run=True, **QUIET)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["sym"] is True and plan["group_size"] == 128
    layer_formats = [set(fs) for fs in plan["experts"].values()]
    assert all(len(s) == 1 for s in layer_formats)
    assert set().union(*layer_formats) <= {"int4", "int8", "keep"} and len(set().union(*layer_formats)) > 1


def test_vllm_target_whole_groups_and_bf16_scales(tmp_path):
    """vLLM's WNA16 MoE kernels take whole groups of 128: a layer whose hidden width (192) is not a multiple of 128
    stays 16-bit whatever the budget, uniform --bits included; in a bfloat16 model the grid's scales are values
    bfloat16 holds (vLLM loads them in the model's dtype)."""
    from compressor.allocation.lp import InfeasibleBudget

    src = save_tiny("mixtral", tmp_path / "s", hidden_size=192, intermediate_size=256)
    vllm = {"allocation.target": "vllm", "quantization.method": "rtn"}
    out = api.compress(recipe(src, tmp_path / "x", **vllm, **{"quantization.bits": 4}), dry_run=True, **QUIET)
    assert {f for fs in json.loads((out / "plan.json").read_text())["experts"].values() for f in fs} == {"keep"}
    keep_bytes = 2 * sum(p.numel() for n, p in load_model(src).named_parameters() if ".experts." in n)
    with pytest.raises(InfeasibleBudget, match=f"smallest size reachable with the allowed formats is {keep_bytes} ") \
            as err:
        api.compress(recipe(src, tmp_path / "y", **vllm, **{"allocation.budget": "12bits"}), dry_run=True, **QUIET)
    assert ("under --target vllm a row must hold whole groups of 128: gate/up rows 192 wide (2 MoE layers) cannot "
            "take int4, int8") in str(err.value)
    assert "down rows 256 wide" not in str(err.value)  # 256 is two whole groups
    assert str(err.value).endswith("or plan for a target these widths fit (--target native takes any width)")
    r = api.target("vllm").resolve(recipe(src, tmp_path / "b", **{"allocation.target": "vllm", "dtype": "bfloat16"}),
                                   log=lambda *_: None)
    assert r.quantization.scale_dtype == "bfloat16" and r.quantization.sym and r.quantization.group_size == 128
    assert api.target("vllm").fits("int4", 256) and not api.target("vllm").fits("int8", 192)


@pytest.mark.parametrize("over, match", [
    ({"quantization.method": "ternary"}, "--method ternary .* --target gguf cannot hold"),
    ({"allocation.objective": "per_layer", "allocation.budget": "3bits"}, "global objective only"),
    ({"quantization.bits": 3, "allocation.target": "vllm"}, "no 3-bit format"),
])
def test_target_refusals(wide, tmp_path, over, match):
    r = recipe(wide, tmp_path / "x", **{"allocation.target": "gguf", **over})
    with pytest.raises(TargetError, match=match):
        api.compress(r, **QUIET)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt, width, expect", [
    ("q4_k", 512, "q4_k"), ("q4_k", 64, "q5_0"), ("q2_k", 96, "q4_0"), ("q4_k", 48, "keep"), ("q8_0", 48, "keep"),
    ("tq1_0", 256, "tq1_0"), ("tq2_0", 32, "q4_0")])
def test_gguf_fallback_is_llama_quantize_substitution(fmt, width, expect):
    """k-quants and TQ need rows of whole 256-weight blocks, the 32-weight types rows of 32; what fits nothing
    stays 16-bit."""
    assert api.target("gguf").fallback(fmt, width) == expect
