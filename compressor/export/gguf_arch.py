"""What llama.cpp needs to know of each family: its architecture name, the hyperparameters it reads, how its
attention rows are ordered, and what it hard-codes that a model's config must agree with.

Facts read off llama.cpp (src/models/<arch>.cpp: load_arch_hparams, load_arch_tensors, build_moe_ffn's
normalisation flag; src/llama-model.cpp: llama_model_rope_type) and gguf-py's constants; the code is ours.
Tensor names come from gguf-py's TensorNameMap (transformers name -> GGUF name); the routed experts are named here
(blk.N.ffn_{gate,up,down}_exps), since this project stores them fused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .source import ExportError


@dataclass(frozen=True)
class GGUFFamily:
    arch: str                    # llama.cpp's architecture name (general.architecture)
    rope_pairs: bool = False     # llama.cpp rotates consecutive pairs (NORM rope), transformers rotates the two halves
                                 # of each head: q and k rows are reordered on export
    norm_topk: bool | None = None  # llama.cpp's fixed choice to renormalise the top-k routing weights; the config's
                                   # norm_topk_prob must agree (None: the family always renormalises, as upstream)
    expert_ff: str | None = None   # config field of the routed experts' width (else intermediate_size)
    shared_ff: str | None = None   # config field of the shared expert's width
    all_moe: tuple[str, ...] = field(default=())  # config fields that would make some layers dense (must be unset)
    mha_only: bool = False       # llama.cpp's q/k norms span the full hidden width: as many key/value heads as heads


GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "mixtral": GGUFFamily("llama", rope_pairs=True),
    "qwen2_moe": GGUFFamily("qwen2moe", norm_topk=False, expert_ff="moe_intermediate_size",
                            shared_ff="shared_expert_intermediate_size", all_moe=("mlp_only_layers",)),
    "qwen3_moe": GGUFFamily("qwen3moe", norm_topk=True, expert_ff="moe_intermediate_size",
                            all_moe=("mlp_only_layers",)),
    "olmoe": GGUFFamily("olmoe", norm_topk=False, mha_only=True),
}


def gguf_family(model_type: str, config: dict) -> GGUFFamily:
    """The family's entry, after checking that llama.cpp runs this config as transformers does."""
    fam = GGUF_FAMILIES.get(model_type)
    if fam is None:
        raise ExportError(f"export --format gguf: model type {model_type!r} is not exported to GGUF yet (supported: "
                          f"{', '.join(GGUF_FAMILIES)}); export it with --format compressed-tensors, or run it with "
                          "this project's runtime")
    norm = config.get("norm_topk_prob")
    if fam.norm_topk is not None and norm is not None and bool(norm) != fam.norm_topk:
        raise ExportError(f"export --format gguf: llama.cpp's {fam.arch} {'always' if fam.norm_topk else 'never'} "
                          f"renormalises the top-k routing weights, but this model's config has norm_topk_prob="
                          f"{norm}: llama.cpp would compute a different model")
    for key in fam.all_moe:
        if config.get(key):
            raise ExportError(f"export --format gguf: this model has dense layers ({key}={config[key]}), which "
                              f"llama.cpp's {fam.arch} does not run (it expects every layer to be an MoE layer)")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if fam.mha_only and kv != heads:
        raise ExportError(f"export --format gguf: llama.cpp's {fam.arch} normalises keys over the full hidden width, so "
                          f"it runs only models with as many key/value heads as heads (this one: {kv} of {heads})")
    if config.get("decoder_sparse_step", 1) != 1:
        raise ExportError(f"export --format gguf: decoder_sparse_step={config['decoder_sparse_step']} makes some "
                          f"layers dense, which llama.cpp's {fam.arch} does not run")
    return fam


def rope_theta(config: dict) -> float | None:
    rope = config.get("rope_parameters") or {}
    return rope.get("rope_theta", config.get("rope_theta"))


def write_hparams(w, fam: GGUFFamily, config: dict, n_vocab: int) -> None:
    """The hyperparameters llama.cpp reads for `fam`, from the transformers config (`w`: a gguf.GGUFWriter)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    if rope_theta(config) is not None:
        w.add_rope_freq_base(float(rope_theta(config)))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_expert_count(config.get("num_local_experts") or config.get("num_experts"))
    w.add_expert_used_count(config["num_experts_per_tok"])
    if fam.expert_ff:
        w.add_expert_feed_forward_length(config[fam.expert_ff])
    if fam.shared_ff and config.get(fam.shared_ff):
        w.add_expert_shared_feed_forward_length(config[fam.shared_ff])
    w.add_vocab_size(n_vocab)


def rope_pair_order(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (weight [heads * d, ...] or bias [heads * d]) from transformers' rotation of
    each head's two halves (i with i + d/2) to llama.cpp's NORM rotation of consecutive pairs (2i with 2i+1): within
    each head, row j of the first half goes to 2j, row j of the second half to 2j + 1. Rows are moved whole, so
    this holds for packed rows of any format too."""
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
