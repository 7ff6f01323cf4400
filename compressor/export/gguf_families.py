"""The few things some families need beyond the common GGUF layout (gguf_arch.py's table names which of these a
family uses): hyperparameters of their own, tensors llama.cpp stores differently, and what llama.cpp computes
differently from transformers for a given config.

Facts of llama.cpp's src/models/{granite,granite-moe,phi3,phimoe,deepseek2,openai-moe}.cpp and
src/llama-graph.cpp (build_moe_ffn), checked against transformers 5.25's modeling files; the code is ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .source import ExportError

# gguf.ExpertGatingFuncType (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_*)
SOFTMAX, SIGMOID = 1, 2


@dataclass(frozen=True)
class Difference:
    """Something llama.cpp computes differently from transformers for this model. `refuse`: a different model
    (export refused unless the differences are accepted); otherwise a small one, exported with a warning."""
    what: str
    refuse: bool


@dataclass(frozen=True)
class TensorRule:
    """A tensor gguf-py's name map does not place: the transformers name's ending, and the GGUF tensors it becomes
    (gguf.MODEL_TENSOR name, "weight" or "bias"); `split` turns it into one tensor per output."""
    suffix: str
    outputs: tuple[tuple[str, str], ...]
    split: Callable[[torch.Tensor, dict], tuple[torch.Tensor, ...]] | None = None


@dataclass(frozen=True)
class Required:
    """A tensor llama.cpp requires that a model may not have (a bias a config turned off): written as zeros,
    which is the model without it."""
    tensor: str          # gguf.MODEL_TENSOR name
    kind: str            # "weight" or "bias"
    size: str            # config field giving its length
    per_layer: bool


def llama_cpp_error(arch: str, what: str) -> ExportError:
    return ExportError(f"export --format gguf: {what}, which llama.cpp's {arch} does not run")


# --- Granite-MoE: the multipliers of transformers' GraniteMoe are llama.cpp's scales -----------------------------

def granite_hparams(c: dict) -> dict:
    hp = {"add_logit_scale": float(c["logits_scaling"])}  # required by llama.cpp (logits / scale)
    for key, method in (("residual_multiplier", "add_residual_scale"), ("embedding_multiplier", "add_embedding_scale"),
                        ("attention_multiplier", "add_attention_scale")):
        if c.get(key) is not None:
            hp[method] = float(c[key])
    return hp


# --- PhiMoE: llama.cpp runs it through its Phi-3 graph ----------------------------------------------------------

def phimoe_differences(c: dict) -> list[Difference]:
    out = [Difference("its LayerNorms (mean-centred, with bias) run as RMSNorms with bias (llama.cpp's phimoe uses "
                      "the Phi-3 graph)", refuse=True),
           Difference("its sparsemixer router (each of the top-2 experts weighted by a softmax over the logits near "
                      "its own maximum, about 1 each) runs as softmax, top-k and renormalisation (weights summing to "
                      "1)", refuse=True)]
    if c.get("sliding_window") and c["sliding_window"] < c["max_position_embeddings"]:
        out.append(Difference(f"its sliding window ({c['sliding_window']} tokens) is not applied (llama.cpp's phimoe "
                              "attends to the whole context)", refuse=True))
    return out


# --- DeepSeek-V2 / V3: multi-head latent attention, shared experts, leading dense layers -------------------------

def split_kv_b(t: torch.Tensor, c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj [H * (nope + v), rank] -> llama.cpp's absorbed-MLA pair: attn_k_b [H, rank, nope] (each head's key
    rows transposed) and attn_v_b [H, v, rank]."""
    nope = c["qk_nope_head_dim"]
    kv = t.reshape(c["num_attention_heads"], nope + c["v_head_dim"], t.shape[-1])
    return kv[:, :nope].transpose(1, 2).contiguous(), kv[:, nope:].contiguous()


DEEPSEEK_TENSORS = (
    TensorRule("self_attn.kv_b_proj.weight", (("ATTN_K_B", "weight"), ("ATTN_V_B", "weight")), split_kv_b),
    TensorRule("mlp.gate.e_score_correction_bias", (("FFN_EXP_PROBS_B", "bias"),)),
)


def deepseek_groups(c: dict) -> int:
    """How many expert groups the router chooses among (1: no group routing)."""
    groups, used = c.get("n_group") or 1, c.get("topk_group") or 1
    if c["model_type"] == "deepseek_v2" and c.get("topk_method", "greedy") == "greedy":
        return 1  # transformers' DeepSeek-V2 ignores the groups under greedy routing
    return groups if used < groups else 1


def deepseek_hparams(c: dict) -> dict:
    rank, rope = c["kv_lora_rank"], c["qk_rope_head_dim"]
    v3 = c["model_type"] == "deepseek_v3"
    hp = {"add_leading_dense_block_count": c.get("first_k_dense_replace") or 0,
          "add_q_lora_rank": c.get("q_lora_rank") or 0,  # 0: one q projection (DeepSeek-V2-Lite)
          "add_kv_lora_rank": rank,
          # absorbed MLA: one key/value head of the latent (+ its rope part); per-head sizes as the _mla lengths
          "add_head_count_kv": 1, "add_key_length": rank + rope, "add_value_length": rank,
          "add_key_length_mla": c["qk_nope_head_dim"] + rope, "add_value_length_mla": c["v_head_dim"],
          "add_rope_dimension_count": rope,
          "add_expert_shared_count": c["n_shared_experts"],
          "add_expert_weights_scale": float(c.get("routed_scaling_factor") or 1.0),
          "add_expert_gating_func": SIGMOID if v3 else SOFTMAX,
          # transformers' DeepSeek-V3 renormalises as its config says; its DeepSeek-V2 never does
          "add_expert_weights_norm": bool(c.get("norm_topk_prob")) if v3 else False}
    if deepseek_groups(c) > 1:
        hp.update(add_expert_group_count=c["n_group"], add_expert_group_used_count=c["topk_group"])
    return hp


def deepseek_differences(c: dict) -> list[Difference]:
    arch = "deepseek2"
    if c.get("attention_bias"):
        raise llama_cpp_error(arch, "this model's attention projections have biases (attention_bias=true)")
    if not c.get("n_shared_experts"):
        raise llama_cpp_error(arch, "this model has no shared expert (n_shared_experts=0)")
    if c["model_type"] == "deepseek_v3" and c.get("rope_interleave") is False:
        raise llama_cpp_error(arch, "rope_interleave=false (rotation of the two halves of the rope dimensions)")
    if c["model_type"] == "deepseek_v2" and deepseek_groups(c) > 1:
        return [Difference(f"its group-limited routing ranks the {c['n_group']} expert groups by their best score; "
                           "llama.cpp ranks them by the sum of their two best", refuse=False)]
    return []


# --- GPT-OSS: sinks, biases, alternating sliding-window layers, SwiGLU with alpha and limit ----------------------

GPT_OSS_TENSORS = (TensorRule("self_attn.sinks", (("ATTN_SINKS", "weight"),)),)


def gpt_oss_hparams(c: dict) -> dict:
    types = c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                     for i in range(c["num_hidden_layers"])]
    return {"add_sliding_window": c["sliding_window"],
            "add_sliding_window_pattern": [t == "sliding_attention" for t in types],
            "add_expert_feed_forward_length": c["intermediate_size"]}


def gpt_oss_differences(c: dict) -> list[Difference]:
    for key, fixed in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):  # build_moe_ffn's LLM_FFN_SWIGLU_OAI_MOE
        if c.get(key, fixed) != fixed:
            raise llama_cpp_error("gpt-oss", f"{key}={c[key]} (llama.cpp fixes it at {fixed})")
    kinds = set(c.get("layer_types") or ()) - {"sliding_attention", "full_attention"}
    if kinds:
        raise llama_cpp_error("gpt-oss", f"layer types {sorted(kinds)}")
    return []
