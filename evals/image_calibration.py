#!/usr/bin/env python
"""Calibration images, measured on a trained vision model: does `--calib-images` help the MoE blocks of a vision
tower at equal expert bytes?

1. A small CLIP vision classifier (CLIPForImageClassification: 6 layers, hidden 128, MLP 512, 16 x 16 input,
   4 x 4 patches) trained here on scikit-learn's handwritten digits (real 8 x 8 scans, 1,797 images, shipped in
   the wheel). Seeded split: held-out test images (never seen in training or calibration), training images, and
   the calibration images, a subset of the training images written as PNG files.
2. `cli.py upcycle --modules 'encoder\\.layers\\.\\d+\\.mlp' --experts 4 --top-k 2` (CuMo), then the MoE fine-tuned
   on the training images (classification loss + load balancing) so that its experts differ.
3. `compress` with and without `--calib-images` at equal bytes: uniform RTN vs GPTQ at int3 / int2, and the budget
   LP on data-free weight errors vs on errors measured on the images. Held-out accuracy and the KL divergence of
   the compressed model's class distribution from the uncompressed MoE's.

Writes evals/results/image_calibration.json. About a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MLPS = r"encoder\.layers\.\d+\.mlp"


def digits(seed: int, test: int):
    """(train images, train labels, test images, test labels): PIL images of the 8 x 8 scans (0..16 -> 0..255)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [Image.fromarray((x * (255 / 16)).round().astype("uint8"), mode="L") for x in d.images]
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    pick = lambda idx: ([images[i] for i in idx], torch.tensor(d.target[idx]))  # noqa: E731
    (te_x, te_y), (tr_x, tr_y) = pick(perm[:test]), pick(perm[test:])
    return tr_x, tr_y, te_x, te_y


def processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def classifier(seed: int):
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                              image_size=16, patch_size=4)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # unused by the classifier
    torch.manual_seed(seed)
    return CLIPForImageClassification(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), num_labels=10))


def fit(model, pixels, labels, epochs: int, lr: float, seed: int, balance: float = 0.0, log=print) -> None:
    """AdamW on cross-entropy (+ the switch balance loss of every MLPMoE router when `balance`)."""
    from compressor.runtime.moe import MLPMoE
    from compressor.upcycle.train import balance_loss

    seen = []
    hooks = [m.router.register_forward_hook(lambda mod, a, out, k=m.top_k: seen.append((out, k)))
             for m in model.modules() if isinstance(m, MLPMoE)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(labels), generator=gen).split(64):
            seen.clear()
            loss = F.cross_entropy(model(pixel_values=pixels[idx]).logits, labels[idx])
            if balance and seen:
                loss = loss + balance * torch.stack([balance_loss(lg, lg.topk(k, -1).indices, lg.shape[-1])
                                                     for lg, k in seen]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 10 == 9 or epoch == epochs - 1:
            log(f"  epoch {epoch + 1}: loss {total / len(labels):.4f}")
    for h in hooks:
        h.remove()
    model.eval()


@torch.no_grad()
def logits_of(model, pixels) -> torch.Tensor:
    return torch.cat([model(pixel_values=b).logits.float() for b in pixels.split(128)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", type=int, default=497, help="held-out images")
    ap.add_argument("--calib", type=int, default=128, help="calibration images (from the training split)")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--moe-epochs", type=int, default=10)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "image_calibration.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile

    import cli
    from compressor.api import MAX_SHARD_BYTES
    from compressor.io.checkpoint import save_model
    from compressor.io.models import load_model
    from compressor.plan import Plan
    from compressor.runtime.moe import CONFIG_KEY, config_entry
    from compressor.upcycle.command import UPCYCLE_JSON

    t0 = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        tr_x, tr_y, te_x, te_y = digits(args.seed, args.test)
        proc = processor()
        prep = lambda ims: proc(images=[im.convert("RGB") for im in ims], return_tensors="pt")["pixel_values"]  # noqa: E731
        tr_p, te_p = prep(tr_x), prep(te_x)
        calib_dir = work / "calib-images"
        calib_dir.mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(tr_x[: args.calib]):
            im.save(calib_dir / f"digit{k:04d}.png")
        print(f"digits: {len(tr_y)} training ({args.calib} of them as calibration PNGs), {len(te_y)} held-out", flush=True)

        dense = classifier(args.seed)
        print("training the dense classifier", flush=True)
        fit(dense, tr_p, tr_y, args.epochs, 1e-3, args.seed)
        dense_acc = float((logits_of(dense, te_p).argmax(-1) == te_y).float().mean())
        print(f"dense held-out accuracy {dense_acc:.4f}", flush=True)
        dense_dir, moe0, moe_dir = work / "dense", work / "moe-copies", work / "moe"
        dense.save_pretrained(dense_dir)
        proc.save_pretrained(dense_dir)
        assert cli.main(["upcycle", str(dense_dir), "--experts", "4", "--top-k", "2", "--modules", MLPS,
                         "--output", str(moe0)]) == 0
        moe = load_model(moe0)
        step0 = float((logits_of(moe, te_p) - logits_of(dense, te_p)).abs().max())
        print(f"up-cycled: max |logit - dense logit| at step 0 = {step0:.2e}; fine-tuning the MoE", flush=True)
        fit(moe, tr_p, tr_y, args.moe_epochs, 3e-4, args.seed + 1, balance=0.01)
        moe_dir.mkdir()
        save_model(moe, moe_dir, torch.float32, MAX_SHARD_BYTES, {CONFIG_KEY: config_entry(moe)})
        proc.save_pretrained(moe_dir)
        (moe_dir / UPCYCLE_JSON).write_text((moe0 / UPCYCLE_JSON).read_text())
        uncompressed = load_model(moe_dir)
        reference = logits_of(uncompressed, te_p)

        def row(model) -> dict:
            lg = logits_of(model, te_p)
            kl = F.kl_div(lg.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
            return {"accuracy": round(float((lg.argmax(-1) == te_y).float().mean()), 4), "kl": round(float(kl), 5)}

        at_16_bits = sum(p.numel() * 2 for n, p in uncompressed.named_parameters() if ".experts." in n and p.dim() == 3)
        rows = {"dense": {"accuracy": round(dense_acc, 4)}, "MoE fp32": row(uncompressed) | {"expert_bytes": at_16_bits}}
        variants = {}
        for bits in (3, 2):
            variants[f"uniform int{bits}, RTN (no data)"] = ["--method", "rtn", "--bits", str(bits)]
            variants[f"uniform int{bits}, GPTQ on images"] = ["--method", "gptq", "--bits", str(bits),
                                                             "--calib-images", str(calib_dir)]
        lp = ["--budget", "2.5bits", "--budget-scope", "experts", "--formats", "keep,int8,int4,int3,int2,ternary"]
        variants["LP 2.5 bits, data-free weight errors, RTN"] = ["--method", "rtn", *lp]
        variants["LP 2.5 bits, errors measured on images, RTN"] = ["--method", "rtn", *lp, "--calib-images", str(calib_dir)]
        variants["LP 2.5 bits, errors measured on images, GPTQ"] = ["--method", "gptq", *lp, "--calib-images", str(calib_dir)]
        for name, flags in variants.items():
            out = work / name.replace(" ", "_").replace(",", "")
            assert cli.main(["compress", str(moe_dir), *flags, "--group-size", str(args.group_size), "--samples",
                             str(args.calib), "--output", str(out)]) == 0
            plan = Plan.load(out / "plan.json")
            rows[name] = row(load_model(out)) | {"expert_bytes": plan.allocation.get("expert_bytes") or
                                                 _expert_bytes(out), "formats": plan.format_counts()}
            print(f"{name:48s} {rows[name]}", flush=True)

    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "data": "scikit-learn load_digits (1,797 real 8x8 scans of handwritten digits), seeded split",
              "train_images": len(tr_y), "test_images": len(te_y), "step0_max_logit_diff": step0,
              "seconds": round(time.time() - t0, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


def _expert_bytes(directory: Path) -> int:
    from compressor.io.checkpoint import tensor_nbytes

    return sum(n for k, n in tensor_nbytes(directory).items() if ".experts." in k)


if __name__ == "__main__":
    sys.exit(main())
