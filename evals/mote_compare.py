#!/usr/bin/env python
"""MoTE's claim measured here: dense vs full-precision up-cycled MoE vs MoTE, same up-cycling tokens,
then the FP models compressed by the budget LP to MoTE's routed-expert memory.

1. the dense model: by default a small Llama pre-trained from scratch on the project's training text
   (~/.cache/moe-compressor/corpora/train.txt if built, else the shipped calib.txt) with a BPE tokenizer
   trained on the same text; with `--dense DIR` a pre-trained model (SmolLM2-135M: `--dense smollm2`);
2. continuations with the same tokens (same seed, same batches): dense (control), FP MoE (CuMo style:
   E experts top-2, Mixtral layout), MoTE (the FFN as shared expert + E ternary experts top-1) and the
   MoTE layout with full-precision experts (ablation). `--train mlp` trains only the FFN / MoE blocks
   (routers, experts, shared expert), as the reference MoE is built; `all` trains every weight;
3. perplexity on the held-out texts (and lm-eval accuracy with `--tasks`); expert memory = bytes of the
   routed experts (fp16 for FP, packed ternary for MoTE; the toolkit's exact byte formulas);
4. each FP model is compressed with `compress --budget B --budget-scope experts` (GPTQ, LP over keep..int2 and
   ternary), B = MoTE's routed-expert bytes, those plus MoTE's 16-bit shared experts (equal MoE-block memory:
   the FP MoE has no shared expert), and 2.5 bits; then measured again.

Writes the JSON after every row; trained models and their training checkpoints live in `--work`, so a killed
run continues where it stopped when re-run with the same arguments.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from compressor.assets import CACHE_DIR, CALIB_TEXT, HELDOUT_TEXTS, SMOLLM2_DIR, TRAIN_TEXT  # noqa: E402
from compressor.quantize.formats import QuantSpec, packed_nbytes  # noqa: E402
from compressor.upcycle import bake_ternary, is_ternary, train, upcycle  # noqa: E402

FORMATS = ["keep", "int8", "int4", "int3", "int2", "ternary"]


def tokenizer_for(text: str, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def ppl(model, ids: torch.Tensor, seq: int) -> float:
    n = ids.numel() // seq
    x = ids[: n * seq].view(n, seq)
    nll = 0.0
    for b in x.split(8):
        logits = model(input_ids=b, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       b[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(nll / (n * (seq - 1)))


def expert_bytes(model, fmt: str, group_size: int) -> int:
    total = 0
    for layer in model.model.layers:
        ex = getattr(layer.mlp, "experts", None)
        if ex is None:
            continue
        E, I2, H = ex.gate_up_proj.shape
        total += E * (packed_nbytes(QuantSpec(fmt, group_size), I2, H) + packed_nbytes(QuantSpec(fmt, group_size), H, I2 // 2))
    return total


def trainable_only_mlp(model) -> None:
    """Freeze everything outside the FFN / MoE blocks; what is frozen inside them (the neutral shared-expert
    gate) stays frozen."""
    for n, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and ".mlp." in n)


def pretrain_dense(args):
    """(dense model, tokenizer, training ids, pre-training tokens): a small Llama trained from scratch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = TRAIN_TEXT if TRAIN_TEXT.is_file() else CALIB_TEXT
    text = src.read_text(encoding="utf-8", errors="replace")[:3_000_000]
    tok = tokenizer_for(text, args.vocab)
    ids = ids_of(tok, text)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.seq * 2, tie_word_embeddings=False)
    dense = LlamaForCausalLM(cfg)
    r = train(dense, ids, args.dense_steps, args.lr, warmup=20, seed=0, batch_size=args.batch, seq_len=args.seq,
              progress=False)
    print(f"dense pre-training on {src.name}: {r.tokens:,} tokens, loss {r.losses[-1]:.3f}, {r.seconds:.0f} s", flush=True)
    return dense.eval(), tok, ids, r.tokens, src


def load_dense(directory: Path):
    from transformers import AutoModelForCausalLM

    from compressor.calibration.data import read_text, tokenize
    from compressor.io.models import load_tokenizer

    if not TRAIN_TEXT.is_file():
        raise SystemExit(f"{TRAIN_TEXT} missing: build it with `python evals/data/build_corpora.py`")
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()
    tok = load_tokenizer(directory)
    ids = tokenize(tok, read_text(TRAIN_TEXT))
    return dense, tok, ids, 0, TRAIN_TEXT


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", default=None,
                    help="a pre-trained dense Llama directory ('smollm2' = the SmolLM2-135M cache); default: pre-train a tiny one")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128, help="training and evaluation window")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dense-steps", type=int, default=400)
    ap.add_argument("--up-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--up-lr", type=float, default=5e-4)
    ap.add_argument("--train", choices=["all", "mlp"], default="all", help="what the continuations train")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="per held-out text")
    ap.add_argument("--tasks", default="", help="lm-eval tasks per row, e.g. piqa,arc_easy")
    ap.add_argument("--limit", type=int, default=200, help="examples per task")
    ap.add_argument("--budgets", default="mote,mote-total,2.5bits",
                    help="expert budgets of the FP models: 'mote' = MoTE's routed-expert bytes, 'mote-total' = those plus "
                    "its 16-bit shared experts (equal MoE-block memory), or any --budget value")
    ap.add_argument("--compress", default="moe,shared", help="FP models to compress: moe (FP MoE), shared (FP shared)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows for the compressions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="trained models and checkpoints (default: the cache)")
    ap.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "mote_compare.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.time()
    dense_dir = SMOLLM2_DIR if args.dense == "smollm2" else (Path(args.dense) if args.dense else None)
    work = args.work or CACHE_DIR / "mote-compare" / (dense_dir.name if dense_dir else "tiny")
    work.mkdir(parents=True, exist_ok=True)
    dense, tok, ids, pretrain_tokens, src = load_dense(dense_dir) if dense_dir else pretrain_dense(args)
    held = {k: ids_of(tok, p.read_text(encoding="utf-8", errors="replace"))[: args.eval_tokens]
            for k, p in HELDOUT_TEXTS.items()}
    print(f"train text {src.name}: {ids.numel():,} tokens; held-out {[v.numel() for v in held.values()]}", flush=True)
    tasks = [t for t in args.tasks.split(",") if t]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"train_text": str(src)}
    result = {"config": config, "dense_pretrain_tokens": pretrain_tokens,
              "upcycle_tokens": args.up_steps * args.batch * args.seq, "rows": {}}
    if dense_dir and args.out.is_file():  # a pre-trained dense model is deterministic: keep the rows measured
        old = json.loads(args.out.read_text())
        what_to_run = {"tasks": "", "budgets": "", "compress": "", "threads": 0}  # rows do not depend on these
        if old.get("config", {}) | what_to_run == config | what_to_run:
            result["rows"] = old["rows"]
    rows = result["rows"]

    def save():
        result["seconds"] = round(time.time() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    def record(name, model, up_tokens, exp_bytes, note=""):
        p = {k: round(ppl(model, v, args.seq), 3) for k, v in held.items()}
        p["mean"] = round(sum(p.values()) / len(held), 3)
        rows[name] = {"ppl": p, "expert_bytes": exp_bytes, "up_tokens": up_tokens,
                      "params": sum(t.numel() for t in model.parameters()), "note": note}
        if tasks:
            from evals.compare import task_accuracy

            rows[name]["tasks"] = task_accuracy(model, tok, tasks, args.limit)
        print(f"{name:36s} ppl {p}  expert bytes {exp_bytes:,} {rows[name].get('tasks', '')}", flush=True)
        save()

    if "dense (pre-trained)" not in rows:
        record("dense (pre-trained)", dense, 0, 0)
    E = args.experts
    variants = {  # name -> (build from the dense model, routed-expert format, note)
        "dense (+continued)": (lambda: _copy(dense), None, ""),
        f"FP MoE {E}e top-2": (lambda: upcycle(dense, E, top_k=2), "keep", ""),
        f"MoTE shared + {E}e ternary top-1": (lambda: upcycle(dense, E, top_k=1, ternary=True, shared_expert=True),
                                             "ternary", ""),
        f"FP shared + {E}e top-1": (lambda: upcycle(dense, E, top_k=1, shared_expert=True), "keep",
                                    "ablation: MoTE layout, fp experts"),
    }
    for name, (build, fmt, note) in variants.items():
        saved = work / _slug(name)
        if name in rows and (fmt != "keep" or (saved / "config.json").is_file()):
            continue
        model = build()
        if args.train == "mlp":
            trainable_only_mlp(model)
        r = train(model, ids, args.up_steps, lr=args.up_lr, seed=1, batch_size=args.batch, seq_len=args.seq,
                  checkpoint_dir=work / f".{_slug(name)}.ckpt", checkpoint_every=20, progress=bool(dense_dir))
        print(f"{name}: {r.tokens:,} tokens in {r.seconds:.0f} s ({r.tokens / max(r.seconds, 1e-9):.0f} tokens/s)", flush=True)
        if fmt == "ternary":
            bake_ternary(model)
            assert all(bool(is_ternary(l.mlp.experts.gate_up_proj.detach(), 128).all()) for l in model.model.layers)
        record(name, model, r.tokens, expert_bytes(model, fmt, 128) if fmt else 0, note)
        if fmt == "keep":  # compressed below
            model.to(torch.bfloat16).save_pretrained(saved)
            tok.save_pretrained(saved)
        shutil.rmtree(work / f".{_slug(name)}.ckpt", ignore_errors=True)  # the row and model are kept instead
        del model
        gc.collect()
    mote_bytes = rows[f"MoTE shared + {E}e ternary top-1"]["expert_bytes"]
    shared_bytes = sum(p.numel() * 2 for n, p in dense.named_parameters() if ".mlp." in n)  # the FFNs at 16 bits
    named = {"mote": f"{mote_bytes}B", "mote-total": f"{mote_bytes + shared_bytes}B"}
    fp_models = {"moe": f"FP MoE {E}e top-2", "shared": f"FP shared + {E}e top-1"}

    from compressor import api
    from compressor.config import Recipe, apply_overrides
    from compressor.io.models import load_model
    from compressor.plan import Plan

    calib = work / "calib.txt"
    calib.write_text(CALIB_TEXT.read_text(encoding="utf-8", errors="replace")[:200_000])
    dense = None  # the builders above are done with it
    gc.collect()
    for budget in [named.get(b, b) for b in args.budgets.split(",") if b]:
        for name in (fp_models[k] for k in args.compress.split(",") if k):
            d = work / _slug(name)
            row = f"{name} @ {budget} experts"
            if row in rows:
                continue
            recipe = apply_overrides(Recipe(), {
                "model": str(d), "output": str(work / f"{d.name}-{budget}"), "allocation.budget": budget,
                "allocation.scope": "experts", "calibration.text": str(calib), "calibration.samples": args.samples,
                "calibration.seq_len": args.seq, "allocation.formats": FORMATS})
            out = api.compress(recipe, overwrite=True, log=lambda *_: None)
            plan = Plan.load(out / "plan.json")
            model = load_model(out)
            record(row, model, rows[name]["up_tokens"], plan.allocation["expert_bytes"],
                   f"GPTQ+LP, formats {plan.format_counts()}")
            del model
            gc.collect()
    result["complete"] = True
    save()
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def plot(result: dict, png: Path) -> None:
    """Mean held-out perplexity against routed-expert bytes, one point per row (dense rows at 0 bytes are drawn
    as horizontal reference lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, r in result["rows"].items():
        mean = r["ppl"]["mean"]
        if not r["expert_bytes"]:
            ax.axhline(mean, ls="--", lw=0.8, color="grey")
            ax.annotate(name, (0.01, mean), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
            continue
        marker = "s" if "MoTE" in name else ("o" if "@" not in name else "^")
        ax.scatter(r["expert_bytes"] / 1e6, mean, marker=marker, label=f"{name}: {mean:.1f}")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_xscale("log")
    means = [r["ppl"]["mean"] for r in result["rows"].values()]
    if max(means) > 20 * min(means):  # a destroyed model: keep the others readable
        ax.set_yscale("log")
    ax.set_xlabel("routed-expert bytes (MB, log)")
    ax.set_ylabel("mean held-out perplexity")
    ax.set_title(f"MoTE vs FP up-cycled MoE ({result['upcycle_tokens']:,} up-cycling tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
