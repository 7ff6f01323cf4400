"""Do our GGUF exports run in llama.cpp as they run here? (evals, never CI: needs the llama.cpp build of
evals/llamacpp.py)

    python -m evals.gguf_check --families [--families-list mixtral,qwen2_moe]   # tiny random models, every family
    python -m evals.gguf_check --model COMPRESSED_DIR [--max-tokens 8192]       # a real model, held-out texts

--families: for each family, a tiny random model (rows of whole 256-weight blocks, so k-quants apply) is
compressed with --target gguf under a budget, exported, and run by both runtimes on the same token windows: the
largest and the mean logit difference relative to the logits' standard deviation, and the perplexities, are
reported (a wrong name, a missed hyperparameter, a wrong rope order or gate/up split shows as a difference of
order 1; llama.cpp's own arithmetic, which rounds activations to 8 bits for quantized matmuls, as a small one).
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
from compressor.io.models import load_model, load_tokenizer
from evals import llamacpp

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_check.json"
WIDE = dict(hidden_size=256, intermediate_size=512)
FAMILY_OVERRIDES = {  # sizes in whole 256-blocks; routing settings llama.cpp hard-codes (gguf_arch.py)
    "mixtral": dict(WIDE),
    "qwen2_moe": dict(WIDE, moe_intermediate_size=256, shared_expert_intermediate_size=512),
    "qwen3_moe": dict(WIDE, moe_intermediate_size=256, norm_topk_prob=True, head_dim=64),
    "olmoe": dict(WIDE, num_key_value_heads=4),  # llama.cpp's olmoe: MHA only (as OLMoE-1B-7B)
}


def quiet(*_):
    pass


def family_check(family: str, root: Path, budget: str, threads: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import budget_recipe, save_tiny

    src = save_tiny(family, root / family / "src", **FAMILY_OVERRIDES.get(family, WIDE))
    recipe = budget_recipe(src, root / family / "out", **{
        "allocation.target": "gguf", "allocation.budget": budget, "allocation.formats": ["keep"],
        "allocation.scope": "experts", "quantization.method": "rtn"})
    out = api.compress(recipe, log=quiet)
    path, summary = export(out, "gguf", root / family / "model.gguf", log=quiet)
    model = load_model(out)
    ids = tokenize(load_tokenizer(out), (src / "heldout.txt").read_text())
    windows = eval_windows(ids, 64)[:4]
    llm = llamacpp.load(path, 64, threads)
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
    return {"family": family, "architecture": summary["architecture"], "types": summary["bytes_by_type"],
            "max_logit_diff_rel": round(worst, 5), "mean_logit_diff_rel": round(mean, 5), "ppl_ours": round(float(torch.tensor(ours_nll / n).exp()), 4),
            "ppl_llama_cpp": round(float(torch.tensor(theirs_nll / n).exp()), 4)}


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
    p.add_argument("--families-list", default=",".join(FAMILY_OVERRIDES))
    p.add_argument("--budget", default="4bits")
    p.add_argument("--model", type=Path, action="append", default=[])
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rows = []
    if args.families:
        with tempfile.TemporaryDirectory() as tmp:
            for fam in args.families_list.split(","):
                rows.append(family_check(fam, Path(tmp), args.budget, args.threads))
                print(json.dumps(rows[-1]))
    for m in args.model:
        rows.append(model_check(m, args.max_tokens, args.seq_len, args.threads))
        print(json.dumps(rows[-1]))
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(old + [{"time": time.strftime("%Y-%m-%d %H:%M"), **r} for r in rows], indent=1))


if __name__ == "__main__":
    main()
