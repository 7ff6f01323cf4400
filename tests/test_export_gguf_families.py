"""`export --format gguf` of the families with layouts of their own (Granite-MoE, PhiMoE, DeepSeek-V2/V3, GPT-OSS):
read back with gguf-py, their tensors carry llama.cpp's names, shapes and the model's values (DeepSeek's kv_b_proj
split and rebuilt exactly), their headers the hyperparameters llama.cpp reads, and what llama.cpp would compute
differently is refused or exported with a warning. Whether llama.cpp then computes the same logits is
evals/gguf_check.py's measurement (README)."""
from __future__ import annotations

import json

import cli
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from compressor import api  # noqa: E402
from compressor.export import ExportError, export  # noqa: E402
from compressor.export.gguf_arch import gguf_family, rope_pair_order  # noqa: E402
from compressor.export.gguf_vocab import GPT4O_REGEX  # noqa: E402
from compressor.io.models import load_model  # noqa: E402
from test_export_gguf import QUIET, field, gguf_recipe, tensors  # noqa: E402
from tiny import save_tiny, tiny_model  # noqa: E402

ROWS_OF_32 = {  # widths in whole 32-weight blocks: uniform 8 bits -> q8_0 everywhere
    "granitemoe": dict(intermediate_size=64),
    "phimoe": dict(intermediate_size=64),
    "deepseek_v2": dict(moe_intermediate_size=64),
    "deepseek_v3": dict(moe_intermediate_size=64, n_routed_experts=4, n_group=2, topk_group=1),
    "gpt_oss": dict(intermediate_size=64),
}


def exported(tmp_path, family, accept=False, split_regex=None, **config):
    """(source dir, GGUF path, the export's log) of a tiny model of `family` compressed at 8 bits for gguf."""
    src = save_tiny(family, tmp_path / "src", split_regex=split_regex, **{**ROWS_OF_32[family], **config})
    out = api.compress(gguf_recipe(src, tmp_path / "out", **{"quantization.bits": 8}), **QUIET)
    logged: list[str] = []
    path, _ = export(out, "gguf", tmp_path / "m.gguf", log=logged.append, accept_differences=accept)
    return src, path, logged


def original(src) -> dict[str, torch.Tensor]:
    return load_model(src, torch.float16).state_dict()


def test_granitemoe_router_scales_and_rope_order(tmp_path):
    multipliers = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                       logits_scaling=6.0)  # granite-3.0-1b-a400m's
    src, path, _ = exported(tmp_path, "granitemoe", **multipliers)
    r, found, sd = gguf.GGUFReader(str(path)), tensors(path), original(src)
    keys = ("embedding_scale", "residual_scale", "attention.scale", "logit_scale")
    for key, value in zip(keys, multipliers.values()):
        assert field(r, f"granitemoe.{key}") == pytest.approx(value)
    router = found["blk.1.ffn_gate_inp.weight"]  # transformers' block_sparse_moe.router, not in gguf-py's map
    assert router.tensor_type.name == "F32"
    assert np.array_equal(np.asarray(router.data), sd["model.layers.1.block_sparse_moe.router.weight"].float().numpy())
    q = sd["model.layers.0.self_attn.q_proj.weight"]  # llama.cpp's granitemoe rotates consecutive pairs
    assert np.array_equal(np.asarray(found["blk.0.attn_q.weight"].data), rope_pair_order(q, 4).numpy())


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_mla_split_dense_lead_and_routing(tmp_path, family):
    src, path, _ = exported(tmp_path, family)
    r, found, sd = gguf.GGUFReader(str(path)), tensors(path), original(src)
    cfg = json.loads((src / "config.json").read_text())
    H, nope, v, rank = (cfg[k] for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank"))
    v3 = family == "deepseek_v3"
    expect = {"leading_dense_block_count": 1, "attention.head_count_kv": 1, "attention.kv_lora_rank": rank,
              "attention.q_lora_rank": cfg["q_lora_rank"] or 0, "attention.key_length": rank + cfg["qk_rope_head_dim"],
              "attention.value_length": rank, "attention.key_length_mla": nope + cfg["qk_rope_head_dim"],
              "attention.value_length_mla": v, "rope.dimension_count": cfg["qk_rope_head_dim"],
              "expert_count": cfg["n_routed_experts"], "expert_shared_count": 1,
              "expert_feed_forward_length": cfg["moe_intermediate_size"],
              "expert_gating_func": 2 if v3 else 1,  # sigmoid (V3) / softmax (V2)
              "expert_weights_norm": v3,  # transformers' V3 renormalises as configured, its V2 never
              "expert_weights_scale": pytest.approx(cfg["routed_scaling_factor"])}
    if v3:
        expect.update({"expert_group_count": 2, "expert_group_used_count": 1})
    for key, value in expect.items():
        assert field(r, f"deepseek2.{key}") == value, key
    # kv_b_proj -> attn_k_b [H, rank, nope] (transposed per head) + attn_v_b [H, v, rank], rebuilt exactly
    k_b, v_b = (np.asarray(found[f"blk.1.attn_{p}_b.weight"].data) for p in ("k", "v"))
    assert k_b.shape == (H, rank, nope) and v_b.shape == (H, v, rank)
    rebuilt = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(H * (nope + v), rank)
    assert np.array_equal(rebuilt, sd["model.layers.1.self_attn.kv_b_proj.weight"].numpy())
    assert "blk.1.attn_kv_b.weight" not in found
    assert {"blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"} <= set(found)  # the leading dense layer
    assert "blk.0.ffn_gate_exps.weight" not in found
    assert found["blk.1.ffn_gate_shexp.weight"].tensor_type.name == "Q8_0"
    assert found["blk.1.ffn_up_exps.weight"].tensor_type.name == "Q8_0"
    if v3:  # the expert-selection bias (nonzero in the tiny model, as trained)
        bias = sd["model.layers.1.mlp.gate.e_score_correction_bias"].float().numpy()
        assert np.array_equal(np.asarray(found["blk.1.exp_probs_b.bias"].data), bias) and bias.any()


def test_gpt_oss_sinks_biases_sliding_layers_yarn_and_o200k_tokenizer(tmp_path):
    src, path, logged = exported(tmp_path, "gpt_oss", split_regex=GPT4O_REGEX)
    r, found, sd = gguf.GGUFReader(str(path)), tensors(path), original(src)
    sinks = found["blk.0.attn_sinks.weight"]
    assert sinks.tensor_type.name == "F32"
    assert np.array_equal(np.asarray(sinks.data), sd["model.layers.0.self_attn.sinks"].float().numpy())
    gate_up_bias = sd["model.layers.1.mlp.experts.gate_up_proj_bias"].float().numpy()  # gate, up interleaved
    assert np.array_equal(np.asarray(found["blk.1.ffn_gate_exps.bias"].data), gate_up_bias[:, ::2])
    assert np.array_equal(np.asarray(found["blk.1.ffn_up_exps.bias"].data), gate_up_bias[:, 1::2])
    assert {"blk.1.ffn_down_exps.bias", "blk.1.ffn_gate_inp.bias", "blk.1.post_attention_norm.weight"} <= set(found)
    assert field(r, "gpt-oss.attention.sliding_window") == 32
    assert field(r, "gpt-oss.attention.sliding_window_pattern") == [True, False]  # sliding, full
    assert field(r, "gpt-oss.rope.scaling.type") == "yarn"
    assert field(r, "gpt-oss.rope.scaling.original_context_length") == 4096
    assert field(r, "tokenizer.ggml.pre") == "gpt-4o"
    # transformers' GPT-OSS config does not round the YaRN ramp (truncate=false), llama.cpp does: said, not refused
    assert any("truncate=false" in m for m in logged if m.startswith("warning"))


def test_phimoe_is_refused_unless_its_differences_are_accepted(tmp_path, capsys):
    """llama.cpp runs PhiMoE through its Phi-3 graph: RMSNorm for LayerNorm, softmax top-k for sparsemixer."""
    src = save_tiny("phimoe", tmp_path / "src", **ROWS_OF_32["phimoe"])
    out = api.compress(gguf_recipe(src, tmp_path / "out", **{"quantization.bits": 8}), **QUIET)
    with pytest.raises(ExportError, match="RMSNorm.*sparsemixer.*--accept-differences"):
        export(out, "gguf", tmp_path / "m.gguf", **QUIET)
    assert not (tmp_path / "m.gguf").exists()
    argv = ["export", str(out), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]
    assert cli.main(argv) == 2
    assert cli.main([*argv, "--accept-differences"]) == 0
    assert "warning: llama.cpp's phimoe computes this model differently" in capsys.readouterr().out
    found = tensors(tmp_path / "m.gguf")
    # llama.cpp requires the output and attention-output biases this config turns off: zeros, the same model
    assert np.array_equal(np.asarray(found["output.bias"].data), np.zeros(300, np.float32))
    assert not np.asarray(found["blk.1.attn_output.bias"].data).any()
    assert {"blk.0.attn_norm.bias", "blk.0.ffn_norm.bias", "output_norm.bias"} <= set(found)


def config_of(family, **over) -> dict:
    return tiny_model(family, **{**ROWS_OF_32.get(family, {}), **over}).config.to_dict()


@pytest.mark.parametrize("family, over, match", [
    ("gpt_oss", dict(swiglu_limit=5.0), "swiglu_limit=5.0"),  # llama.cpp fixes alpha 1.702, limit 7
    ("granitemoe", dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)), "'linear'"),
    ("gpt_oss", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                          beta_fast=16.0, rope_theta=1.5e5)), "beta_fast"),
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave"),
    ("deepseek_v2", dict(attention_bias=True), "attention_bias"),
    ("deepseek_v3", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                              mscale=1.0, mscale_all_dim=0.707, rope_theta=1e4)), "mscale"),
])
def test_configs_llama_cpp_cannot_run_are_refused(family, over, match):
    with pytest.raises(ExportError, match=match):
        gguf_family(family, config_of(family, **over))


def test_deepseek_v2_group_limited_routing_is_a_named_difference():
    """transformers' DeepSeek-V2 ranks groups by their best score, llama.cpp by the sum of the best two."""
    _, diffs = gguf_family("deepseek_v2", config_of("deepseek_v2", topk_method="group_limited_greedy",
                                                    n_routed_experts=8, n_group=4, topk_group=2))
    assert [d.refuse for d in diffs] == [False] and "two best" in diffs[0].what
    _, greedy = gguf_family("deepseek_v2", config_of("deepseek_v2", n_group=4, topk_group=2))  # groups unused
    assert greedy == []
