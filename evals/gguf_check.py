"""Do our GGUF exports run in llama.cpp as they run here? (evals, never CI: needs the llama.cpp build of
evals/llamacpp.py)

    python -m evals.gguf_check --families [--families-list mixtral,gpt_oss/truncate] [--exact]  # tiny random models
    python -m evals.gguf_check --model COMPRESSED_DIR [--max-tokens 8192]       # a real model, held-out texts

--families: for each case (a family and a config, CASES), a tiny random model (rows of whole 256-weight blocks, so
k-quants apply) is compressed with --target gguf under a budget, exported (with --accept-differences: the
differences llama.cpp's graph has by design are measured here, and listed in the row), and run by both runtimes on
the same token windows: the largest and the mean logit difference relative to the logits' standard deviation, the
perplexities, and whether llama.cpp tokenizes the held-out text as we do are reported (a wrong name, a missed
hyperparameter, a wrong rope order or gate/up split shows as a difference of order 1; llama.cpp's own arithmetic,
which rounds activations to 8 bits for quantized matmuls and to 16 bits for F16 ones, as a small one, and as a
larger one at a token whose routing is a near-tie that the rounding decides the other way). --exact: 16-bit plans,
written as F32 and run in float32 by llama.cpp, which leaves only the model's differences.
--model: perplexity of a compressed model on each held-out text, here and in llama.cpp (the same windows of our
tokenizer's ids), and whether llama.cpp's tokenizer gives the same ids as ours.
Results are appended to evals/results/gguf_check.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from compressor import api
from compressor.assets import HELDOUT_TEXTS
from compressor.calibration.data import eval_windows, read_text, tokenize
from compressor.export import export
from compressor.export.gguf_vocab import GPT4O_REGEX
from compressor.io.models import load_model, load_tokenizer
from evals import llamacpp

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_check.json"
WIDE = dict(hidden_size=256, intermediate_size=512)
MLA = dict(WIDE, moe_intermediate_size=256, n_routed_experts=8, kv_lora_rank=64, qk_nope_head_dim=32,
           qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=256,
           rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=0.707,
                                mscale_all_dim=0.707, rope_theta=10000.0))  # YaRN as DeepSeek-V2-Lite's
OSS = dict(WIDE, intermediate_size=256, head_dim=64, sliding_window=32, layer_types=["sliding_attention",
           "full_attention"], rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                   beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                   rope_theta=150000.0))  # as GPT-OSS's, for short windows
CASES = {  # name: (model type, config); sizes in whole 256-blocks; routing settings llama.cpp hard-codes (gguf_arch.py)
    "mixtral": ("mixtral", dict(WIDE)),
    "qwen2_moe": ("qwen2_moe", dict(WIDE, moe_intermediate_size=256, shared_expert_intermediate_size=512)),
    "qwen3_moe": ("qwen3_moe", dict(WIDE, moe_intermediate_size=256, norm_topk_prob=True, head_dim=64)),
    "olmoe": ("olmoe", dict(WIDE, num_key_value_heads=4)),  # llama.cpp's olmoe: MHA only (as OLMoE-1B-7B)
    "granitemoe": ("granitemoe", dict(WIDE, embedding_multiplier=12.0, residual_multiplier=0.22,
                                      attention_multiplier=0.015625, logits_scaling=6.0)),  # granite-3.0-1b-a400m's
    "phimoe": ("phimoe", dict(WIDE)),
    "deepseek_v2": ("deepseek_v2", dict(MLA)),
    "deepseek_v2/group_limited": ("deepseek_v2", dict(MLA, topk_method="group_limited_greedy", n_group=4,
                                                      topk_group=2)),
    "deepseek_v3": ("deepseek_v3", dict(MLA, q_lora_rank=128, n_group=4, topk_group=2, norm_topk_prob=True,
                                        routed_scaling_factor=2.5, rope_parameters=dict(
                                            MLA["rope_parameters"], mscale=1.0, mscale_all_dim=1.0))),
    "gpt_oss": ("gpt_oss", dict(OSS)),
    "gpt_oss/truncate": ("gpt_oss", dict(OSS, rope_parameters=dict(OSS["rope_parameters"], truncate=True))),
}
SPLIT_TOKENIZER = {"gpt_oss": GPT4O_REGEX}  # a tokenizer pre-split as the family's own (o200k)


def quiet(*_):
    pass


def family_check(case: str, root: Path, budget: str, threads: int, exact: bool = False) -> dict:
    """`exact`: every tensor kept 16-bit and written as F32, keys and values cached in F32, so that llama.cpp
    computes in float32 as our runtime does: what remains is a different model (or a routing decision taken the
    other way on a near-tie), not 8-bit activations or F16 rounding."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import budget_recipe, save_tiny

    family, config = CASES[case]
    work = root / case.replace("/", "-")
    src = save_tiny(family, work / "src", split_regex=SPLIT_TOKENIZER.get(family), **config)
    recipe = budget_recipe(src, work / "out", **{
        "allocation.target": "gguf", "allocation.budget": "16bits" if exact else budget, "allocation.formats": ["keep"],
        "allocation.scope": "experts", "quantization.method": "rtn", **({"quantization.bits": 16} if exact else {})})
    out = api.compress(recipe, log=quiet)
    warnings: list[str] = []
    path, summary = export(out, "gguf", work / "model.gguf", accept_differences=True, float32=exact,
                           log=lambda m: warnings.append(m) if m.startswith("warning") else None)
    model = load_model(out)
    text = (src / "heldout.txt").read_text()
    ids = tokenize(load_tokenizer(out), text)
    windows = eval_windows(ids, 64)[:4]
    llm = llamacpp.load(path, 64, threads, f32_cache=exact)
    worst, mean, ours_nll, theirs_nll = 0.0, 0.0, 0.0, 0.0
    for w in windows:
        with torch.no_grad():
            ours = model(input_ids=w[None]).logits[0].float()
        theirs = torch.from_numpy(llamacpp.window_logits(llm, w))
        worst = max(worst, float((ours - theirs).abs().max() / ours.std()))
        mean += float((ours - theirs).abs().mean() / ours.std()) / len(windows)
        ce = torch.nn.functional.cross_entropy
        ours_nll += float(ce(ours[:-1], w[1:], reduction="sum"))
        theirs_nll += float(ce(theirs[:-1], w[1:], reduction="sum"))
    n = windows.numel() - windows.shape[0]
    return {"family": case, "exact": exact, "architecture": summary["architecture"], "types": summary["bytes_by_type"],
            "max_logit_diff_rel": round(worst, 5), "mean_logit_diff_rel": round(mean, 5),
            "ppl_ours": round(float(torch.tensor(ours_nll / n).exp()), 4),
            "ppl_llama_cpp": round(float(torch.tensor(theirs_nll / n).exp()), 4),
            "same_tokenization": llamacpp.tokenize(path, text) == ids.tolist(), "differences": warnings}


def model_check(model_dir: Path, max_tokens: int, seq_len: int, threads: int) -> dict:
    tok = load_tokenizer(model_dir)
    gguf = model_dir.parent / f"{model_dir.name}.gguf"
    if not gguf.exists():
        export(model_dir, "gguf", gguf)
    model = load_model(model_dir)
    row = {"model": str(model_dir), "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
           "expert_bytes": llamacpp.tensor_bytes(gguf), "types": llamacpp.tensor_types(gguf)}
    for name, path in HELDOUT_TEXTS.items():
        text = read_text(path)
        ids = tokenize(tok, text)[:max_tokens]
        windows = eval_windows(ids, seq_len)
        ours = api.perplexity(model, ids, seq_len, progress=False)["perplexity"]
        theirs = llamacpp.perplexity(gguf, windows, threads)["perplexity"]
        sample = text[:20000]
        same_ids = llamacpp.tokenize(gguf, sample) == tokenize(tok, sample).tolist()
        row[name] = {"ppl_ours": round(ours, 4), "ppl_llama_cpp": round(theirs, 4),
                     "rel_diff": round(theirs / ours - 1, 5), "same_tokenization": same_ids}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", action="store_true")
    p.add_argument("--families-list", default=",".join(CASES))
    p.add_argument("--budget", default="4bits")
    p.add_argument("--exact", action="store_true", help="16-bit plans run in float32 by llama.cpp (see family_check)")
    p.add_argument("--model", type=Path, action="append", default=[])
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rows = []
    if args.families:
        with tempfile.TemporaryDirectory() as tmp:
            for fam in args.families_list.split(","):
                rows.append(family_check(fam, Path(tmp), args.budget, args.threads, args.exact))
                print(json.dumps(rows[-1]))
    for m in args.model:
        rows.append(model_check(m, args.max_tokens, args.seq_len, args.threads))
        print(json.dumps(rows[-1]))
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(old + [{"time": time.strftime("%Y-%m-%d %H:%M"), **r} for r in rows], indent=1))


if __name__ == "__main__":
    main()
