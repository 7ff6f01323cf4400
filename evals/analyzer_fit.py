"""Which importance signal predicts the real damage? `python -m evals.analyzer_fit [--model DIR]`.

Ground truth: the increase in held-out NLL (nats/token) when ONE expert is quantized (RTN, --format, group 128)
and every other weight stays 16-bit; measured for the most and the least used expert of every --layer-step-th
layer. Predictors: the LP cost columns of that format for each objective (compressor.planning.costs, the same
numbers the LPs minimise: global = eps^2 times the layer's loss sensitivity, "global (output energy)" = eps^2 /
layer output energy; per_layer = MC-MoE phi * w^1.5 * eps; frequency = phi * mean error), the Hessian-weighted
weight error tr(dW H dW^T) / layer output energy, and the routing statistics alone. `--predictors-only` keeps the
ablations of an earlier run (its dNLL per expert) and recomputes the predictors (minutes instead of the ablations'
half hour on the reference MoE). Reports Spearman rank correlation over the ablated experts (all layers pooled:
the global LP compares experts across layers, so that is the ranking that matters) and within layers
(pairs: does the predictor order the two experts of a layer right).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from compressor import api
from compressor.arch.view import find_moe_blocks
from compressor.assets import HELDOUT_TEXTS, REFERENCE_MODEL_DIR
from compressor.calibration.data import read_text, tokenize
from compressor.calibration.layerwise import layerwise
from compressor.calibration.sensitivity import layer_sensitivity
from compressor.config import Recipe, apply_overrides
from compressor.io.models import load_model, load_tokenizer
from compressor.measure import MeasurePass, candidates
from compressor.planning import costs
from evals.compare import RESULTS


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def nll(model, ids: torch.Tensor, seq_len: int) -> float:
    return math.log(api.perplexity(model, ids, seq_len, progress=False)["perplexity"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL_DIR)
    p.add_argument("--format", default="int2")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=16, help="calibration windows of 512 for the measurements")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per text for the ground truth")
    p.add_argument("--layer-step", type=int, default=3)
    p.add_argument("--sensitivity-samples", type=int, default=Recipe().allocation.sensitivity_samples)
    p.add_argument("--predictors-only", action="store_true",
                   help="reuse the dNLL of the experts ablated by an earlier run with these settings")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)  # the ablations edit expert weights in place
    t0 = time.time()
    model, tok = load_model(a.model), load_tokenizer(a.model)
    ids = torch.cat([tokenize(tok, read_text(path))[:a.eval_tokens] for path in HELDOUT_TEXTS.values()])
    settings = {"model": str(a.model), "format": a.format, "group_size": a.group_size, "eval_tokens": int(ids.numel())}
    earlier = earlier_run(f"analyzers_{a.model.name}", settings) if a.predictors_only else None
    blocks = find_moe_blocks(model)
    recipe = apply_overrides(Recipe(), {"model": str(a.model), "calibration.samples": a.samples})
    windows = api.calibration_data(recipe, tok)
    measure = MeasurePass(blocks, [a.format], a.group_size, False)
    layerwise(model, windows, measure)
    ms = measure.results
    energy = np.concatenate([np.full(m.count.shape[0], m.out_energy) for m in ms])
    sensitivity = layer_sensitivity(model, windows[:a.sensitivity_samples])
    predictors = {"global": costs(ms, "global", sensitivity)[:, 0], "global (output energy)": costs(ms, "global")[:, 0]}
    predictors.update({obj: costs(ms, obj)[:, 0] for obj in ("per_layer", "frequency")})
    hess = torch.cat([m.hess_err[:, 0] for m in ms]).double().numpy() / energy  # per routed token (H is a mean)
    predictors["hessian per token"] = hess
    predictors["hessian x tokens"] = hess * torch.cat([m.count for m in ms]).double().numpy()
    predictors["frequency alone"] = torch.cat([m.count.double() / m.total_tokens for m in ms]).numpy()
    predictors["routing weight alone"] = torch.cat([m.weight_sum.double() for m in ms]).numpy()

    base = earlier["base_nll"] if earlier else nll(model, ids, 512)
    offsets = np.cumsum([0] + [b.num_experts for b in blocks])
    rows = []
    for li in range(0, len(blocks), a.layer_step):
        b, m = blocks[li], ms[li]
        for e in (int(m.count.argmax()), int(m.count.argmin())):
            if earlier:
                if (b.layer_idx, e) not in earlier["rows"]:
                    raise SystemExit(f"--predictors-only: layer {b.layer_idx} expert {e} was not ablated by the earlier "
                                     "run (other --samples or --layer-step?); run without --predictors-only")
                delta = earlier["rows"][(b.layer_idx, e)]
            else:
                delta = ablated_nll(model, ids, b, e, a.format, a.group_size) - base
            i = int(offsets[li] + e)
            rows.append({"layer": b.layer_idx, "expert": e, "share": float(m.count[e]) / m.total_tokens,
                         "delta_nll": delta, **{k: float(v[i]) for k, v in predictors.items()}})
            print(f"layer {b.layer_idx} expert {e}: share {rows[-1]['share']:.3f} dNLL {delta:+.5f}", flush=True)
    out = {**settings, "base_nll": base, "predictors": list(predictors), "rows": rows,
           "seconds": earlier["seconds"] if earlier else round(time.time() - t0, 1)}
    write(out, f"analyzers_{a.model.name}")


def ablated_nll(model, ids: torch.Tensor, b, e: int, fmt: str, group_size: int) -> float:
    """Held-out NLL with expert e of block b quantized (RTN) and everything else as it is; the expert restored after."""
    gu, d = b.gate_up(), b.down()
    saved = gu[e].clone(), d[e].clone()
    for w in (gu, d):
        w[e].copy_(candidates(w[e:e + 1].float(), fmt, group_size, False)[0].to(w.dtype))
    try:
        return nll(model, ids, 512)
    finally:
        gu[e].copy_(saved[0])
        d[e].copy_(saved[1])


def earlier_run(name: str, settings: dict) -> dict:
    """The ablations of an earlier run with the same settings: base NLL, {(layer, expert): dNLL}, seconds."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"--predictors-only: no earlier run at {path}; run without it first")
    old = json.loads(path.read_text())
    if any(old.get(k) != v for k, v in settings.items()):
        raise SystemExit(f"--predictors-only: {path} was run with other settings "
                         f"({ {k: old.get(k) for k in settings} }); run without --predictors-only")
    return {"base_nll": old["base_nll"], "seconds": old["seconds"],
            "rows": {(r["layer"], r["expert"]): r["delta_nll"] for r in old["rows"]}}


def write(out: dict, name: str) -> None:
    """Spearman over the ablated experts (pooled) and within-layer pair order, then JSON and markdown."""
    rows, predictors = out["rows"], out["predictors"]
    truth = [r["delta_nll"] for r in rows]
    pooled = {k: spearman([r[k] for r in rows], truth) for k in predictors}
    pairs = [(rows[j], rows[j + 1]) for j in range(0, len(rows), 2)]
    within = {k: float(np.mean([(x[k] > y[k]) == (x["delta_nll"] > y["delta_nll"]) for x, y in pairs]))
              for k in predictors}
    out = {**out, "spearman_pooled": pooled, "within_layer_pair_accuracy": within}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    lines = ["| predictor | Spearman vs dNLL (pooled) | within-layer pair order right |", "|---|---|---|"]
    lines += [f"| {k} | {pooled[k]:+.3f} | {within[k]:.2f} |" for k in predictors]
    lines.append(f"\n{len(rows)} single-expert ablations ({out['format']} RTN, group {out['group_size']}) on "
                 f"{Path(out['model']).name}; dNLL on {out['eval_tokens']} held-out tokens, base NLL {out['base_nll']:.4f}.")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
