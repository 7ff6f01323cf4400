"""What llama.cpp needs to know of each family: its architecture name, the hyperparameters it reads, how its
attention rows are ordered, the tensors gguf-py does not name, and what it computes differently from transformers.

A family is a row of GGUF_FAMILIES; the few functions some rows name live in gguf_families.py. Facts read off
llama.cpp (src/models/<arch>.cpp: load_arch_hparams, load_arch_tensors, build_moe_ffn's flags; src/llama-model.cpp:
llama_model_rope_type; src/llama-context.cpp: YaRN) and gguf-py's constants; the code is ours. Tensor names come
from gguf-py's TensorNameMap (transformers name -> GGUF name) but for the family's TensorRules; the routed experts
are named in gguf_file.py (blk.N.ffn_{gate,up,down}_exps), since this project stores them fused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import gguf_families as F
from .gguf_families import Difference, Required, TensorRule
from .source import ExportError


@dataclass(frozen=True)
class GGUFFamily:
    arch: str                    # llama.cpp's architecture name (general.architecture)
    rope_pairs: bool = False     # llama.cpp rotates consecutive pairs (NORM rope), transformers rotates the two halves
                                 # of each head: q and k rows are reordered on export
    norm_topk: bool | None = None  # llama.cpp's fixed choice to renormalise the top-k routing weights; the config's
                                   # norm_topk_prob must agree (None: the family's own rule, as upstream)
    expert_ff: str | None = None   # config field of the routed experts' width (else intermediate_size)
    shared_ff: str | None = None   # config field of the shared expert's width
    all_moe: tuple[str, ...] = field(default=())  # config fields that would make some layers dense (must be unset)
    mha_only: bool = False       # llama.cpp's q/k norms span the full hidden width: as many key/value heads as heads
    hparams: Callable[[dict], dict] | None = None  # the family's own hyperparameters (GGUFWriter method -> value)
    tensors: tuple[TensorRule, ...] = ()  # tensors gguf-py's name map does not place
    required: tuple[Required, ...] = ()   # tensors llama.cpp requires that a config may leave out (written as zeros)
    differences: Callable[[dict], list[Difference]] | None = None  # refuses (ExportError) or lists differences
    yarn_log_mul: bool = False   # DeepSeek's YaRN: mscale_all_dim is written (as llama.cpp's converter: times 0.1)


PHIMOE_REQUIRED = (Required("OUTPUT", "bias", "vocab_size", per_layer=False),
                   Required("ATTN_OUT", "bias", "hidden_size", per_layer=True))

GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "mixtral": GGUFFamily("llama", rope_pairs=True),
    "qwen2_moe": GGUFFamily("qwen2moe", norm_topk=False, expert_ff="moe_intermediate_size",
                            shared_ff="shared_expert_intermediate_size", all_moe=("mlp_only_layers",)),
    "qwen3_moe": GGUFFamily("qwen3moe", norm_topk=True, expert_ff="moe_intermediate_size",
                            all_moe=("mlp_only_layers",)),
    "olmoe": GGUFFamily("olmoe", norm_topk=False, mha_only=True),
    "granitemoe": GGUFFamily("granitemoe", rope_pairs=True, hparams=F.granite_hparams,
                             tensors=(TensorRule("block_sparse_moe.router.weight", (("FFN_GATE_INP", "weight"),)),)),
    "phimoe": GGUFFamily("phimoe", required=PHIMOE_REQUIRED, differences=F.phimoe_differences),
    "deepseek_v2": GGUFFamily("deepseek2", expert_ff="moe_intermediate_size", hparams=F.deepseek_hparams,
                              tensors=F.DEEPSEEK_TENSORS, differences=F.deepseek_differences, yarn_log_mul=True),
    "deepseek_v3": GGUFFamily("deepseek2", expert_ff="moe_intermediate_size", hparams=F.deepseek_hparams,
                              tensors=F.DEEPSEEK_TENSORS, differences=F.deepseek_differences, yarn_log_mul=True),
    "gpt_oss": GGUFFamily("gpt-oss", hparams=F.gpt_oss_hparams, tensors=F.GPT_OSS_TENSORS,
                          differences=F.gpt_oss_differences),
}
EXPERT_COUNT = ("num_local_experts", "num_experts", "n_routed_experts")


def gguf_family(model_type: str, config: dict) -> tuple[GGUFFamily, list[Difference]]:
    """The family's entry and what llama.cpp computes differently for this config, after refusing (ExportError)
    what llama.cpp cannot run or would run as a different model whatever the user accepts."""
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
    diffs = fam.differences(config) if fam.differences else []
    return fam, diffs + rope_scaling(fam, config)[1]


def rope_parameters(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def rope_theta(config: dict) -> float | None:
    return rope_parameters(config).get("rope_theta", config.get("rope_theta"))


def rope_scaling(fam: GGUFFamily, config: dict) -> tuple[dict, list[Difference]]:
    """llama.cpp's rope-scaling hyperparameters for the config's rope_parameters, and their differences.

    Default rope and YaRN are exported. llama.cpp takes YaRN's factor and original context from the file but its
    beta_fast / beta_slow (32, 1) from its own defaults, derives the attention factor from the factor (DeepSeek: and
    mscale_all_dim, assumed equal to mscale), and rounds the correction range outward, as transformers' `truncate`
    (default true) does."""
    rope = rope_parameters(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}, []
    if kind != "yarn":
        raise ExportError(f"export --format gguf: rope scaling {kind!r} is not exported to GGUF yet (default rope and "
                          "yarn are)")
    if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
        raise ExportError("export --format gguf: yarn rope_parameters need 'factor' and "
                          "'original_max_position_embeddings', which llama.cpp reads from the file")
    for key, fixed in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if (rope.get(key) or fixed) != fixed:
            raise F.llama_cpp_error(fam.arch, f"yarn {key}={rope[key]} (llama.cpp uses {fixed})")
    if rope.get("attention_factor") is not None:
        raise F.llama_cpp_error(fam.arch, "an explicit yarn attention_factor")
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    hp = {"add_rope_scaling_type": "yarn", "add_rope_scaling_factor": float(rope["factor"]),
          "add_rope_scaling_orig_ctx_len": int(rope["original_max_position_embeddings"])}
    if fam.yarn_log_mul:
        if not (mscale and mscale == mscale_all):
            raise F.llama_cpp_error(fam.arch, f"yarn with mscale={mscale}, mscale_all_dim={mscale_all} (llama.cpp's "
                                              "deepseek2 computes the attention scale for mscale == mscale_all_dim)")
        hp["add_rope_scaling_yarn_log_mul"] = 0.1 * float(mscale_all)
    elif mscale or mscale_all:
        raise F.llama_cpp_error(fam.arch, "yarn mscale / mscale_all_dim")
    diffs = []
    if rope.get("truncate", True) is False:
        diffs.append(Difference("its YaRN correction range is not rounded (truncate=false); llama.cpp rounds it "
                                "outward, so the rotation frequencies of the dimensions in the ramp differ slightly",
                                refuse=False))
    return hp, diffs


def hparams(fam: GGUFFamily, config: dict, n_vocab: int) -> dict:
    """The hyperparameters llama.cpp reads for `fam`, from the transformers config: GGUFWriter method -> value."""
    from gguf import ExpertGatingFuncType, RopeScalingType

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    hp = {"add_context_length": config["max_position_embeddings"], "add_embedding_length": config["hidden_size"],
          "add_block_count": config["num_hidden_layers"], "add_feed_forward_length": config["intermediate_size"],
          "add_head_count": heads, "add_head_count_kv": config.get("num_key_value_heads") or heads,
          "add_key_length": head_dim, "add_value_length": head_dim, "add_rope_dimension_count": head_dim,
          "add_layer_norm_rms_eps": float(config["rms_norm_eps"]),
          "add_expert_count": next(config[k] for k in EXPERT_COUNT if config.get(k)),
          "add_expert_used_count": config["num_experts_per_tok"], "add_vocab_size": n_vocab}
    if rope_theta(config) is not None:
        hp["add_rope_freq_base"] = float(rope_theta(config))
    if fam.expert_ff:
        hp["add_expert_feed_forward_length"] = config[fam.expert_ff]
    if fam.shared_ff and config.get(fam.shared_ff):
        hp["add_expert_shared_feed_forward_length"] = config[fam.shared_ff]
    hp.update(rope_scaling(fam, config)[0])
    if fam.hparams:
        hp.update(fam.hparams(config))
    enums = {"add_rope_scaling_type": RopeScalingType, "add_expert_gating_func": ExpertGatingFuncType}
    return {k: enums[k](v) if k in enums else v for k, v in hp.items()}


def rope_pair_order(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (weight [heads * d, ...] or bias [heads * d]) from transformers' rotation of
    each head's two halves (i with i + d/2) to llama.cpp's NORM rotation of consecutive pairs (2i with 2i+1): within
    each head, row j of the first half goes to 2j, row j of the second half to 2j + 1. Rows are moved whole, so
    this holds for packed rows of any format too."""
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
