"""Tiny random models of every supported family, saved with a small tokenizer. Used by tests only:
random weights exercise the plumbing, never a quality claim."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the quick brown fox jumps over the lazy dog while experts route tokens to the best of "
         "their knowledge and the router learns which expert knows what ").split()


def tiny_text(n_words: int = 4000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx)


def tiny_tokenizer(split_regex: str | None = None):
    """Byte-level BPE; GPT-2's pre-tokenizer, or `split_regex` then bytes (the Llama 3 / Qwen 2 / GPT-4o layout)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split_regex is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([tiny_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


COMMON = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False)

CONFIGS = {
    "mixtral": dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                      head_dim=16),
    "olmoe": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                        num_hidden_layers=3),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                        num_hidden_layers=3),
    "granitemoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=32),
}


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # router weights large enough that routing is uneven, like a trained model
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2:
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():  # DeepSeek-V3's expert-selection bias, as trained (zeros at init)
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model


def save_tiny(model_type: str, directory: Path, dtype=torch.float16, max_shard_size: str | None = None,
              split_regex: str | None = None, **overrides) -> Path:
    model = tiny_model(model_type, **overrides).to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tiny_tokenizer(split_regex).save_pretrained(directory)
    (directory / "calib.txt").write_text(tiny_text(6000, seed=1))
    (directory / "heldout.txt").write_text(tiny_text(3000, seed=2))
    return directory


def file_tensor_bytes(directory: Path) -> int:
    """Tensor bytes of every safetensors file in `directory`, read with safetensors itself (not our reader)."""
    from safetensors import safe_open

    total = 0
    for f in Path(directory).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(st.get_tensor(k).nbytes for k in st.keys())
    return total


def budget_recipe(src: Path, out: Path, **over):
    """A small budget-path recipe for a saved tiny model (its own calibration text, every format allowed)."""
    from compressor.config import Recipe, apply_overrides

    base = {"model": str(src), "output": str(out), "quantization.group_size": 16, "calibration.samples": 6,
            "calibration.seq_len": 48, "calibration.text": str(src / "calib.txt"),
            "allocation.formats": ["keep", "int8", "int4", "int3", "int2", "ternary", "drop"]}
    return apply_overrides(Recipe(), {**base, **over})
