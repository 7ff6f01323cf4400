#!/usr/bin/env python
"""Train the shipped default model: a small MixtralForCausalLM (8 experts, top-2) from scratch on CPU.

Steps (all deterministic given the seed and the corpora):
  1. byte-level BPE tokenizer (vocab 8192) trained with `tokenizers` on the training text
     (built by evals/data/build_corpora.py; never on calibration or held-out text)
  2. the training text is tokenized once and cached as uint16 ids (documents separated by <|endoftext|>)
  3. a ~30 s throughput benchmark sizes the run so that training fits --train-minutes of wall time
  4. AdamW + linear warmup + cosine decay, seq len 256, fp32, random windows from the token stream;
     Switch load-balancing loss applied PER LAYER (transformers' built-in aux loss pools all layers,
     which lets individual layers collapse onto a few experts) with a small coefficient
  5. checkpoint (model + optimizer + data RNG + planned steps) every --ckpt-minutes; `--resume`
     continues an interrupted run with the same schedule
  6. save float16 safetensors + tokenizer into --out, reload with AutoModelForCausalLM, compare fp16 vs
     fp32 perplexity on each held-out text, report per-layer expert usage on the calibration text,
     write training_stats.json and TRAINING.md.

Typical use (what produced compressor/assets/default_model):
  nohup python evals/models/train_default_model.py --train-minutes 30 > ~/.cache/moe-compressor/train_default_model.log 2>&1 &
  python evals/models/train_default_model.py --resume ...     # after an interruption
  python evals/models/train_default_model.py --finalize-only  # ship the latest checkpoint as is
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from compressor.assets import CALIB_TEXT, DEFAULT_MODEL_DIR, HELDOUT_TEXTS  # noqa: E402

CACHE = Path(os.environ.get("MOE_COMPRESSOR_CACHE", Path.home() / ".cache" / "moe-compressor"))
EOS = "<|endoftext|>"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ----------------------------------------------------------------------------- tokenizer / data

def train_tokenizer(train_txt: Path, vocab: int, workdir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = workdir / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # documents are separated by blank lines in train.txt; feed paragraphs as a deterministic iterator
    text = train_txt.read_text(encoding="utf-8")
    paras = text.split("\n\n")
    tok.train_from_iterator((p + "\n\n" for p in paras), trainer=trainer, length=len(paras))
    workdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=1024
    )


def encode_text(tok, text: str) -> np.ndarray:
    """Tokenize a text whose documents are separated by blank lines (chunked for speed)."""
    paras = text.split("\n\n")
    chunks, buf, n = [], [], 0
    for p in paras:
        buf.append(p)
        n += len(p)
        if n > 20_000:
            chunks.append("\n\n".join(buf) + "\n\n")
            buf, n = [], 0
    if buf:
        chunks.append("\n\n".join(buf) + "\n\n")
    ids = [e.ids for e in tok.encode_batch(chunks)]
    return np.fromiter((i for seq in ids for i in seq), dtype=np.uint16)


def train_ids(tok, train_txt: Path, workdir: Path) -> np.ndarray:
    path = workdir / "train_ids.npy"
    if path.exists():
        return np.load(path)
    ids = encode_text(tok, train_txt.read_text(encoding="utf-8"))
    np.save(path, ids)
    return ids


# ----------------------------------------------------------------------------- model

def make_config(args, vocab_size: int, eos_id: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        router_aux_loss_coef=args.balance_coef,
        output_router_logits=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        sliding_window=None,
    )


def per_layer_balance_loss(router_logits, top_k: int, n_experts: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed separately for every layer and summed.

    For one layer: L = E * sum_e f_e * P_e, f_e = fraction of top-k slots routed to e, P_e = mean router prob.
    L = 1 for perfectly uniform routing (per layer), so the sum over layers is >= n_layers.
    """
    total = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        top = probs.topk(top_k, dim=-1).indices
        f = F.one_hot(top, n_experts).float().sum(1).mean(0) / top_k
        p = probs.mean(0)
        total = total + n_experts * (f * p).sum()
    return total


def lr_at(step: int, total: int, warmup: int, peak: float, floor_frac: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def get_batch(ids: np.ndarray, rng: np.random.Generator, bsz: int, seq: int) -> torch.Tensor:
    starts = rng.integers(0, len(ids) - seq - 1, size=bsz)
    return torch.from_numpy(np.stack([ids[s : s + seq + 1].astype(np.int64) for s in starts]))


def train_step(model, opt, batch, args):
    inp, tgt = batch[:, :-1], batch[:, 1:]
    out = model(input_ids=inp, output_router_logits=True, use_cache=False)
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), tgt.reshape(-1))
    bal = per_layer_balance_loss(out.router_logits, args.top_k, args.experts)
    loss = ce + args.balance_coef * bal
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce.item(), bal.item(), gn.item()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def perplexity(model, ids: np.ndarray, seq: int = 256, max_tokens: int | None = None, bsz: int = 8) -> float:
    """Non-overlapping windows of `seq` tokens; every token but the first of a window is scored."""
    if max_tokens:
        ids = ids[:max_tokens]
    n = (len(ids) - 1) // seq
    windows = torch.from_numpy(ids[: n * seq + 1].astype(np.int64))
    nll, count = 0.0, 0
    for b in range(0, n, bsz):
        batch = torch.stack([windows[i * seq : (i + 1) * seq] for i in range(b, min(n, b + bsz))])
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def expert_usage(model, ids: np.ndarray, seq: int = 256, max_tokens: int = 40_000) -> list[list[float]]:
    """Share of top-k routing slots per expert, per layer, on `ids` (rows sum to 1)."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)
    ids = ids[:max_tokens]
    n = len(ids) // seq
    windows = torch.from_numpy(ids[: n * seq].astype(np.int64)).view(n, seq)
    for b in range(0, n, 8):
        out = model(input_ids=windows[b : b + 8], output_router_logits=True, use_cache=False)
        for li, logits in enumerate(out.router_logits):
            top = logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices
            counts[li] += torch.bincount(top.reshape(-1), minlength=cfg.num_local_experts).float()
    return (counts / counts.sum(1, keepdim=True)).tolist()


def unigram_ppl(train: np.ndarray, ids: np.ndarray, vocab: int) -> float:
    c = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    p = c / c.sum()
    return float(np.exp(-np.log(p[ids]).mean()))


# ----------------------------------------------------------------------------- checkpointing

def save_ckpt(path: Path, model, opt, step, total, rng, elapsed, history):
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "total_steps": total,
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "elapsed": elapsed,
            "history": history,
        },
        tmp,
    )
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-text", type=Path, default=CACHE / "corpora" / "train.txt")
    ap.add_argument("--workdir", type=Path, default=CACHE / "default_model_run")
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--train-minutes", type=float, default=30.0, help="wall-time budget for the optimisation loop")
    ap.add_argument("--bench-seconds", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=0, help="fix the number of steps instead of sizing from the benchmark")
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--finalize-only", action="store_true", help="skip training; export the latest checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts-impl", default="grouped_mm", help="transformers experts kernel used for training/eval")
    ap.add_argument("--eval-fp32-tokens", type=int, default=8192, help="tokens per held-out text for the fp32-vs-fp16 check")
    ap.add_argument("--routing-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2.5e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--balance-coef", type=float, default=0.01)
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.workdir / "ckpt.pt"
    log("argv:", " ".join(sys.argv))
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")

    if not args.train_text.exists():
        sys.exit(f"missing {args.train_text}: run evals/data/build_corpora.py first")
    tok = train_tokenizer(args.train_text, args.vocab, args.workdir)
    eos_id = tok.token_to_id(EOS)
    ids = train_ids(tok, args.train_text, args.workdir)
    log(f"tokenizer vocab {tok.get_vocab_size()}, training tokens available {len(ids):,} "
        f"({args.train_text.stat().st_size / len(ids):.2f} bytes/token)")

    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    cfg = make_config(args, tok.get_vocab_size(), eos_id)
    model = MixtralForCausalLM(cfg)
    # grouped_mm expert kernel: same maths as the default per-expert loop, ~3x faster on CPU here
    model.config._experts_implementation = args.experts_impl
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: MixtralForCausalLM, {n_params:,} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    rng = np.random.default_rng(args.seed)
    step, total, elapsed, history = 0, 0, 0.0, []
    bench = None

    if args.resume or args.finalize_only:
        if not ckpt_path.exists():
            sys.exit(f"no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, total, elapsed, history = ck["step"], ck["total_steps"], ck["elapsed"], ck["history"]
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        log(f"resumed at step {step}/{total}, {elapsed / 60:.1f} min trained so far")
    model.train()
    tokens_per_step = args.batch * args.seq

    if not args.finalize_only and total == 0:
        # ---- throughput benchmark (on a throwaway copy so the real run's init/RNG are unaffected)
        import copy

        bm, bo = copy.deepcopy(model), copy.deepcopy(opt)
        bo = torch.optim.AdamW(bm.parameters(), lr=1e-4)
        brng = np.random.default_rng(0)
        train_step(bm, bo, get_batch(ids, brng, args.batch, args.seq), args)  # warm-up step
        t0, nb = time.time(), 0
        while time.time() - t0 < args.bench_seconds:
            train_step(bm, bo, get_batch(ids, brng, args.batch, args.seq), args)
            nb += 1
        dt = (time.time() - t0) / nb
        del bm, bo
        bench = {"seconds_per_step": dt, "tokens_per_second": tokens_per_step / dt, "steps": nb}
        total = args.steps or max(args.warmup + 10, int(args.train_minutes * 60 * 0.95 / dt))
        log(f"benchmark: {dt:.2f} s/step, {tokens_per_step / dt:,.0f} tokens/s -> planning {total} steps "
            f"({total * tokens_per_step:,} tokens, ~{total * dt / 60:.1f} min)")
        (args.workdir / "bench.json").write_text(json.dumps(bench))
    elif (args.workdir / "bench.json").exists():
        bench = json.loads((args.workdir / "bench.json").read_text())

    # ---- training loop
    last_ckpt = time.time()
    t_loop = time.time() - elapsed
    ce_avg = bal_avg = None
    while not args.finalize_only and step < total:
        lr = lr_at(step, total, args.warmup, args.lr, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        ce, bal, gn = train_step(model, opt, get_batch(ids, rng, args.batch, args.seq), args)
        step += 1
        ce_avg = ce if ce_avg is None else 0.95 * ce_avg + 0.05 * ce
        bal_avg = bal if bal_avg is None else 0.95 * bal_avg + 0.05 * bal
        if step % 20 == 0 or step == total:
            el = time.time() - t_loop
            history.append({"step": step, "ce": round(ce_avg, 4), "balance": round(bal_avg, 4), "lr": lr, "elapsed": round(el, 1)})
            log(f"step {step}/{total} ce {ce_avg:.3f} (ppl {math.exp(ce_avg):.1f}) balance/layer {bal_avg / args.layers:.3f} "
                f"gnorm {gn:.2f} lr {lr:.2e} {step * tokens_per_step / el:,.0f} tok/s elapsed {el / 60:.1f} min")
        if time.time() - last_ckpt > args.ckpt_minutes * 60 or step == total:
            save_ckpt(ckpt_path, model, opt, step, total, rng, time.time() - t_loop, history)
            last_ckpt = time.time()
            log(f"checkpoint saved at step {step}")
    if not args.finalize_only:
        elapsed = time.time() - t_loop

    # ---- export float16
    from transformers import AutoTokenizer

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    for f in args.out.glob("*.safetensors"):
        f.unlink()
    model_fp32 = model
    half = MixtralForCausalLM(cfg)
    half.load_state_dict(model.state_dict())
    half = half.half()
    half.config.dtype = torch.float16
    half.save_pretrained(args.out, safe_serialization=True)
    hf_tokenizer(tok).save_pretrained(args.out)
    # transformers 5 writes its internal class name (TokenizersBackend); the portable name loads in 4.x and 5.x
    tcfg_path = args.out / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg_path.write_text(json.dumps(tcfg, indent=2) + "\n")
    log(f"saved float16 model + tokenizer to {args.out}")

    # ---- reload and evaluate
    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    rtok = AutoTokenizer.from_pretrained(args.out)
    assert type(reloaded).__name__ == "MixtralForCausalLM", type(reloaded)
    log(f"reloaded: {type(reloaded).__name__} dtype {reloaded.dtype}, tokenizer {type(rtok).__name__}")
    reloaded32 = reloaded.float().eval()
    reloaded32.config._experts_implementation = args.experts_impl
    results = {}
    for name, path in HELDOUT_TEXTS.items():
        hid = encode_text(tok, path.read_text(encoding="utf-8"))
        assert (np.asarray(rtok(path.read_text(encoding="utf-8")[:2000])["input_ids"]) >= 0).all()
        p16 = perplexity(reloaded32, hid)
        n32 = args.eval_fp32_tokens + 1
        p32_slice = perplexity(model_fp32, hid, max_tokens=n32)
        p16_slice = perplexity(reloaded32, hid, max_tokens=n32)
        uni = unigram_ppl(ids, hid, tok.get_vocab_size())
        results[name] = {"tokens": int(len(hid)), "ppl_fp16_weights": p16, "unigram_ppl": uni,
                         "fp32_vs_fp16_slice_tokens": args.eval_fp32_tokens,
                         "ppl_fp32_slice": p32_slice, "ppl_fp16_slice": p16_slice,
                         "bytes_per_token": path.stat().st_size / len(hid)}
        log(f"held-out {name}: {len(hid):,} tokens, ppl (shipped fp16 weights) {p16:.2f}, unigram {uni:.1f}; "
            f"first {args.eval_fp32_tokens} tokens fp32 {p32_slice:.3f} vs fp16 {p16_slice:.3f}")
    # native fp16 forward on a small slice (CPU fp16 matmul), for the record
    try:
        hid = encode_text(tok, HELDOUT_TEXTS["pydocs"].read_text(encoding="utf-8"))
        rh = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float16).eval()
        results["pydocs_2k_native_fp16"] = perplexity(rh, hid, max_tokens=2049)
        results["pydocs_2k_fp32"] = perplexity(model_fp32, hid, max_tokens=2049)
        log(f"pydocs first 2k tokens: native fp16 ppl {results['pydocs_2k_native_fp16']:.2f}, fp32 {results['pydocs_2k_fp32']:.2f}")
    except Exception as e:  # pragma: no cover - fp16 CPU kernels missing
        log(f"native fp16 forward failed: {e!r}")

    calib_ids = encode_text(tok, CALIB_TEXT.read_text(encoding="utf-8"))
    usage = expert_usage(reloaded32, calib_ids, max_tokens=args.routing_tokens)
    routing = []
    for li, shares in enumerate(usage):
        mn, mx = min(shares), max(shares)
        routing.append({"layer": li, "shares": [round(s, 4) for s in shares], "min": mn, "max": mx,
                        "max_over_min": mx / mn if mn > 0 else float("inf")})
        log(f"layer {li} expert share: min {mn:.3f} max {mx:.3f} ratio {mx / max(mn, 1e-9):.1f}  "
            + " ".join(f"{s:.3f}" for s in shares))

    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    stats = {
        "architecture": "MixtralForCausalLM",
        "parameters": n_params,
        "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "num_local_experts",
                                                  "num_experts_per_tok", "max_position_embeddings", "tie_word_embeddings")},
        "train": {"seed": args.seed, "seq_len": args.seq, "batch": args.batch, "tokens_per_step": tokens_per_step,
                  "steps": step, "planned_steps": total, "tokens_trained": step * tokens_per_step,
                  "training_tokens_available": int(len(ids)), "epochs": step * tokens_per_step / len(ids),
                  "lr": args.lr, "min_lr_frac": args.min_lr_frac, "warmup": args.warmup,
                  "weight_decay": args.weight_decay, "balance_coef_per_layer": args.balance_coef,
                  "loop_wall_seconds": elapsed, "tokens_per_second": step * tokens_per_step / max(elapsed, 1e-9),
                  "benchmark": bench, "finished": step >= total, "threads": args.threads},
        "heldout": results,
        "routing_calib": {"tokens": int(min(len(calib_ids), args.routing_tokens)), "layers": routing},
        "model_dir_bytes": size,
        "history": history,
    }
    (args.out / "training_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    log(f"model dir {size:,} bytes; total script wall time {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
