#!/usr/bin/env python
"""MoTE's claim at tiny scale: dense vs full-precision up-cycled MoE vs MoTE, same up-cycling tokens,
then the FP MoE compressed by the budget LP to MoTE's expert memory.

1. a small dense Llama is pre-trained from scratch on the project's training text
   (~/.cache/moe-compressor/corpora/train.txt if built, else the shipped calib.txt) with a BPE tokenizer
   trained on the same text;
2. three continuations with the same tokens (same seed, same batches): dense (control), FP MoE
   (CuMo/MoE-LLaVA style: E experts top-2, Mixtral layout), MoTE (shared FFN + E ternary experts top-1);
3. perplexity on the held-out texts; expert memory = bytes of the routed experts (fp16 for FP, packed
   ternary for MoTE, the toolkit's exact byte formulas);
4. the FP MoE is compressed with `compress --budget <MoTE expert bytes> --budget-scope experts` and
   measured again. MoTE's experts are measured as trained (exactly ternary; packing them is lossless
   with upcycle.exact_ternary once the lead wires it).

Writes evals/results/mote_compare.json. Random-init tiny models: a sanity check of direction, not the
paper's scale.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from compressor.assets import CALIB_TEXT, HELDOUT_TEXTS, TRAIN_TEXT  # noqa: E402
from compressor.quantize.formats import QuantSpec, packed_nbytes  # noqa: E402
from compressor.upcycle import bake_ternary, is_ternary, train, upcycle  # noqa: E402


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dense-steps", type=int, default=400)
    ap.add_argument("--up-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--up-lr", type=float, default=5e-4)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="per held-out text")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "mote_compare.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.time()
    from transformers import LlamaConfig, LlamaForCausalLM

    src = TRAIN_TEXT if TRAIN_TEXT.is_file() else CALIB_TEXT
    text = src.read_text(encoding="utf-8", errors="replace")[:3_000_000]
    tok = tokenizer_for(text, args.vocab)
    ids = ids_of(tok, text)
    held = {k: ids_of(tok, p.read_text(encoding="utf-8", errors="replace"))[: args.eval_tokens] for k, p in HELDOUT_TEXTS.items()}
    print(f"train text {src.name}: {ids.numel():,} tokens; held-out {[v.numel() for v in held.values()]}", flush=True)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.seq * 2, tie_word_embeddings=False)
    dense = LlamaForCausalLM(cfg)
    kw = dict(batch_size=args.batch, seq_len=args.seq, progress=False)
    r = train(dense, ids, args.dense_steps, args.lr, warmup=20, seed=0, **kw)
    print(f"dense pre-training: {r.tokens:,} tokens, loss {r.losses[-1]:.3f}, {r.seconds:.0f} s", flush=True)
    dense.eval()

    rows = {}

    def record(name, model, up_tokens, exp_bytes, note=""):
        p = {k: round(ppl(model, v, args.seq), 3) for k, v in held.items()}
        p["mean"] = round(sum(p.values()) / len(held), 3)
        rows[name] = {"ppl": p, "expert_bytes": exp_bytes, "up_tokens": up_tokens,
                      "params": sum(t.numel() for t in model.parameters()), "note": note}
        print(f"{name:28s} ppl {p}  expert bytes {exp_bytes:,}", flush=True)

    record("dense (pre-trained)", dense, 0, 0)
    up = dict(lr=args.up_lr, seed=1, **kw)
    cont = copy.deepcopy(dense)
    r = train(cont, ids, args.up_steps, **up)
    record("dense (+continued)", cont, r.tokens, 0)
    fp = upcycle(dense, args.experts, top_k=2)
    r = train(fp, ids, args.up_steps, **up)
    record(f"FP MoE {args.experts}e top-2", fp, r.tokens, expert_bytes(fp, "keep", 128))
    mote = upcycle(dense, args.experts, top_k=1, ternary=True, shared_expert=True)
    r = train(mote, ids, args.up_steps, **up)
    bake_ternary(mote)
    assert all(bool(is_ternary(l.mlp.experts.gate_up_proj.detach(), 128).all()) for l in mote.model.layers)
    mote_bytes = expert_bytes(mote, "ternary", 128)
    record(f"MoTE shared + {args.experts}e ternary top-1", mote, r.tokens, mote_bytes)
    fps = upcycle(dense, args.experts, top_k=1, shared_expert=True)
    r = train(fps, ids, args.up_steps, **up)
    record(f"FP shared + {args.experts}e top-1", fps, r.tokens, expert_bytes(fps, "keep", 128), "ablation: MoTE layout, fp experts")

    from compressor import api
    from compressor.config import Recipe, apply_overrides
    from compressor.io.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.txt"
        calib.write_text(CALIB_TEXT.read_text(encoding="utf-8", errors="replace")[:200_000])
        for name, model in ((f"FP MoE {args.experts}e top-2", fp), (f"FP shared + {args.experts}e top-1", fps)):
            d = tmp / name.replace(" ", "_")
            model.to(torch.float16).save_pretrained(d)
            model.float()
            tok.save_pretrained(d)
            for budget in (f"{mote_bytes}B", "2.5bits"):
                recipe = apply_overrides(Recipe(), {
                    "model": str(d), "output": str(tmp / f"{d.name}-{budget}"), "allocation.budget": budget,
                    "allocation.scope": "experts", "calibration.text": str(calib), "calibration.samples": 32,
                    "calibration.seq_len": args.seq,
                    "allocation.formats": ["keep", "int8", "int4", "int3", "int2", "ternary"]})
                out = api.compress(recipe, log=lambda *_: None)
                plan = json.loads((out / "plan.json").read_text())
                fmts = {}
                for v in plan["experts"].values():
                    for f in v:
                        fmts[f] = fmts.get(f, 0) + 1
                record(f"{name} @ {budget} experts", load_model(out), rows[name]["up_tokens"],
                       plan["allocation"]["expert_bytes"], f"GPTQ+LP, formats {fmts}")

    result = {"config": vars(args) | {"out": str(args.out), "train_text": str(src)},
              "dense_pretrain_tokens": args.dense_steps * args.batch * args.seq,
              "upcycle_tokens": args.up_steps * args.batch * args.seq,
              "seconds": round(time.time() - t0, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


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
    ax.set_xlabel("routed-expert bytes (MB, log)")
    ax.set_ylabel("mean held-out perplexity")
    ax.set_title(f"MoTE vs FP up-cycled MoE ({result['upcycle_tokens']:,} up-cycling tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
