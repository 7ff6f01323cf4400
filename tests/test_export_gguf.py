"""`export --format gguf`: read back with gguf-py (the library llama.cpp's Python side is), every expert tensor
dequantizes to exactly this project's weights, names/types/shapes are llama.cpp's, the tokenizer and the
hyperparameters are the model's; plans GGUF cannot hold are refused and nothing is written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from compressor import api  # noqa: E402
from compressor.arch.view import find_moe_blocks  # noqa: E402
from compressor.export import ExportError, export  # noqa: E402
from compressor.export.gguf_arch import rope_pair_order  # noqa: E402
from compressor.io.models import load_model  # noqa: E402
from compressor.plan import split_format  # noqa: E402
from tiny import budget_recipe, save_tiny  # noqa: E402

QUIET = dict(log=lambda *_: None)
WIDE = dict(hidden_size=256, intermediate_size=512)  # rows of whole 256-weight blocks: k-quants fit


def gguf_recipe(src, out, **over):
    return budget_recipe(src, out, **{"allocation.target": "gguf", "allocation.formats": ["keep"],
                                      "allocation.scope": "experts", "quantization.method": "rtn", **over})


@pytest.fixture(scope="module")
def mixtral_gguf(tmp_path_factory):
    """A tiny wide Mixtral under a 4-bit budget with --target gguf (k-quants chosen per layer and projection)."""
    root = tmp_path_factory.mktemp("gguf")
    src = save_tiny("mixtral", root / "src", **WIDE)
    out = api.compress(gguf_recipe(src, root / "out", **{"allocation.budget": "4bits"}), **QUIET)
    path, summary = export(out, "gguf", root / "model.gguf", **QUIET)
    return src, out, path, summary


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def field(reader, key):
    return reader.fields[key].contents()


def expert_rows(b, e: int, proj: str) -> torch.Tensor:
    pair = getattr(b.block.experts, str(e))
    W = (pair.down if proj == "down" else pair.gate_up).dequantized()
    if proj == "down":
        return W
    half = W.shape[0] // 2
    return W[:half] if proj == "gate" else W[half:]


def test_every_expert_tensor_dequantizes_to_our_weights_exactly(mixtral_gguf):
    _, out, path, _ = mixtral_gguf
    plan = json.loads((out / "plan.json").read_text())
    model = load_model(out)
    found = tensors(path)
    types = set()
    for b in find_moe_blocks(model):
        fmt_gu, fmt_d = split_format(plan["experts"][b.name][0])
        for proj, fmt in (("gate", fmt_gu), ("up", fmt_gu), ("down", fmt_d)):
            t = found[f"blk.{b.layer_idx}.ffn_{proj}_exps.weight"]
            assert t.tensor_type.name == ("F16" if fmt == "keep" else fmt.upper())
            ours = torch.stack([expert_rows(b, e, proj) for e in range(b.num_experts)]).numpy()
            assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), ours)
            types.add(t.tensor_type.name)
    assert len(types) > 1  # the budget plan mixes types across layers / projections


def test_expert_bytes_are_the_plans(mixtral_gguf):
    _, out, path, _ = mixtral_gguf
    plan = json.loads((out / "plan.json").read_text())
    exps = sum(int(t.n_bytes) for n, t in tensors(path).items() if "_exps." in n)
    assert exps == plan["allocation"]["expert_bytes"]


def test_dense_tensors_names_types_and_llama_row_order(mixtral_gguf):
    src, _, path, _ = mixtral_gguf
    original = load_model(src, torch.float16)
    sd = original.state_dict()
    found = tensors(path)
    cfg = original.config
    q = found["blk.0.attn_q.weight"]
    assert q.tensor_type.name == "F16"
    # llama.cpp's 'llama' architecture rotates consecutive pairs: q and k rows are reordered, nothing else
    assert np.array_equal(np.asarray(q.data), rope_pair_order(sd["model.layers.0.self_attn.q_proj.weight"],
                                                              cfg.num_attention_heads).numpy())
    k = found["blk.1.attn_k.weight"]
    assert np.array_equal(np.asarray(k.data), rope_pair_order(sd["model.layers.1.self_attn.k_proj.weight"],
                                                              cfg.num_key_value_heads).numpy())
    assert np.array_equal(np.asarray(found["blk.0.attn_v.weight"].data), sd["model.layers.0.self_attn.v_proj.weight"])
    router = found["blk.0.ffn_gate_inp.weight"]
    assert router.tensor_type.name == "F32"
    assert np.array_equal(np.asarray(router.data), sd["model.layers.0.mlp.gate.weight"].float().numpy())
    assert found["output_norm.weight"].tensor_type.name == "F32"
    assert {"token_embd.weight", "output.weight"} <= set(found)


def test_rope_pair_order_is_the_rotation_llama_cpp_applies():
    """transformers rotates (x_i, x_{i+d/2}); llama.cpp's NORM rope rotates (x_2i, x_2i+1). The reordered q, k
    give the same attention scores under the two conventions."""
    n_heads, d, pos = 2, 8, 5
    theta = 10000.0 ** (-torch.arange(0, d, 2).float() / d) * pos  # [d/2]
    cos, sin = theta.cos(), theta.sin()
    x = torch.randn(n_heads * d)

    def rotate_halves(v):  # transformers
        v = v.view(n_heads, 2, d // 2)
        a, b = v[:, 0], v[:, 1]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], 1).reshape(-1)

    def rotate_pairs(v):  # llama.cpp NORM
        v = v.view(n_heads, d // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(-1)

    assert torch.allclose(rope_pair_order(rotate_halves(x), n_heads), rotate_pairs(rope_pair_order(x, n_heads)))


def test_metadata_and_tokenizer(mixtral_gguf):
    src, _, path, summary = mixtral_gguf
    r = gguf.GGUFReader(str(path))
    cfg = json.loads((src / "config.json").read_text())
    assert field(r, "general.architecture") == "llama" == summary["architecture"]
    assert field(r, "llama.expert_count") == cfg["num_local_experts"]
    assert field(r, "llama.expert_used_count") == cfg["num_experts_per_tok"]
    assert field(r, "llama.block_count") == cfg["num_hidden_layers"]
    assert field(r, "llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    tok = json.loads((src / "tokenizer.json").read_text())
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"]
    for t, i in tok["model"]["vocab"].items():
        assert tokens[i] == t
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.bos_token_id") == tok["model"]["vocab"]["<s>"]
    assert len(field(r, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_families_export_with_llama_cpp_names(tmp_path, family):
    """Narrow tiny models (rows of 64 and 48-96): uniform 8 bits -> q8_0 (32-weight blocks fit)."""
    widths = {"olmoe": dict(intermediate_size=64, num_key_value_heads=4)}.get(  # llama.cpp's olmoe is MHA only
        family, dict(moe_intermediate_size=64))  # rows of 32-blocks
    routing = {"qwen3_moe": dict(norm_topk_prob=True)}.get(family, {})  # as Qwen3-30B-A3B's config.json
    src = save_tiny(family, tmp_path / "src", **widths, **routing)
    out = api.compress(gguf_recipe(src, tmp_path / "out", **{"quantization.bits": 8}), **QUIET)
    path, summary = export(out, "gguf", tmp_path / "m.gguf", **QUIET)
    found = tensors(path)
    arch = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}[family]
    assert summary["architecture"] == arch
    cfg = json.loads((src / "config.json").read_text())
    E, L = cfg.get("num_local_experts") or cfg["num_experts"], cfg["num_hidden_layers"]
    for i in range(L):
        for proj in ("gate", "up", "down"):
            t = found[f"blk.{i}.ffn_{proj}_exps.weight"]
            assert t.tensor_type.name == "Q8_0" and int(t.shape[-1]) == E  # GGUF lists dims innermost first
    if family == "qwen2_moe":  # shared expert and its sigmoid gate (a vector in llama.cpp)
        assert found["blk.0.ffn_gate_inp_shexp.weight"].shape.tolist() == [cfg["hidden_size"]]
        assert {"blk.0.ffn_up_shexp.weight", "blk.0.attn_q.bias"} <= set(found)
    if family in ("qwen3_moe", "olmoe"):
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(found)


def test_native_per_expert_plan_is_refused_and_nothing_written(tmp_path):
    src = save_tiny("mixtral", tmp_path / "src")
    out = api.compress(budget_recipe(src, tmp_path / "out", **{"quantization.method": "rtn", "quantization.bits": 4}),
                       **QUIET)
    with pytest.raises(ExportError, match="--target gguf"):
        export(out, "gguf", tmp_path / "m.gguf", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_llama_cpp_would_compute_another_model_is_refused(tmp_path):
    """Qwen2-MoE in llama.cpp never renormalises the top-k weights."""
    src = save_tiny("qwen2_moe", tmp_path / "src", norm_topk_prob=True)
    out = api.compress(gguf_recipe(src, tmp_path / "out", **{"quantization.bits": 8}), **QUIET)
    with pytest.raises(ExportError, match="norm_topk_prob"):
        export(out, "gguf", tmp_path / "m.gguf", **QUIET)


def test_uncompressed_input_is_refused(tmp_path):
    src = save_tiny("mixtral", tmp_path / "src")
    with pytest.raises(ExportError, match="not a model compressed"):
        export(src, "gguf", tmp_path / "m.gguf", **QUIET)


def test_gguf_experts_read_back_into_the_original_model(mixtral_gguf):
    """evals/gguf_weights.py (how llama.cpp's own quantizations are evaluated with our tooling) reads the experts
    back exactly: the original model with the GGUF's experts holds our compressed model's expert weights."""
    from evals.gguf_weights import model_with_gguf_experts

    src, out, path, _ = mixtral_gguf
    back = {b.layer_idx: b for b in find_moe_blocks(model_with_gguf_experts(src, path))}
    for b in find_moe_blocks(load_model(out)):
        for e in range(b.num_experts):
            gate_up = torch.cat([expert_rows(b, e, "gate"), expert_rows(b, e, "up")])
            assert torch.equal(back[b.layer_idx].gate_up()[e], gate_up)
            assert torch.equal(back[b.layer_idx].down()[e], expert_rows(b, e, "down"))


def test_olmoe_with_grouped_kv_heads_is_refused(tmp_path):
    """llama.cpp's olmoe normalises k over the full hidden width (shape checked at load): MHA only."""
    src = save_tiny("olmoe", tmp_path / "src", intermediate_size=64)  # 4 heads, 2 kv heads
    out = api.compress(gguf_recipe(src, tmp_path / "out", **{"quantization.bits": 8}), **QUIET)
    with pytest.raises(ExportError, match="as many key/value heads as heads"):
        export(out, "gguf", tmp_path / "m.gguf", **QUIET)


def test_float32_export_holds_the_same_values(mixtral_gguf, tmp_path):
    """export(float32=True) (evals/gguf_check.py --exact): 16-bit tensors as F32 with the same values, packed rows
    unchanged."""
    _, out, path, _ = mixtral_gguf
    f32, _ = export(out, "gguf", tmp_path / "f32.gguf", float32=True, **QUIET)
    wide = tensors(f32)
    for name, t in tensors(path).items():
        w = wide[name]
        if t.tensor_type.name == "F16":
            assert w.tensor_type.name == "F32"
            assert np.array_equal(np.asarray(w.data), np.asarray(t.data).astype(np.float32))
        else:
            assert w.tensor_type == t.tensor_type and np.array_equal(np.asarray(w.data), np.asarray(t.data))
