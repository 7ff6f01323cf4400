"""Calibrating the per-layer thresholds beta_l for a target reduction of activated expert parameters.

One pass over the calibration windows with nothing pruned records, per MoE layer, the importance
signal of every token and the ratio r = w_j / w_1 of every droppable slot (every selected expert but
the token's top one). Then, per layer:
  - the importance threshold is the (1 - protect) quantile of the signal: those tokens are protected;
  - the slots of non-protected tokens are the candidates; a layer dropping its n_l candidates with the
    smallest r has beta_l between the n_l-th and (n_l+1)-th smallest r.
Allocation of the dropped parameter mass across layers (target t = fraction of activated routed-expert
parameters removed overall):
  uniform  every layer drops the same fraction t of its own activated slots (n_l = t * slots_l). Each
           layer's beta_l is a different quantile of its own ratio distribution, so a layer with flat
           routing (ratios near 1) gets a high beta and a peaked one a low beta. Default (measured best,
           see evals/results/odp_curve.json).
  global   one beta shared by all layers, chosen so the pooled drops hit t: MC-MoE's fixed-beta rule with
           the beta calibrated for the target (the baseline of the evaluation curve).
Both never hard-code beta. `method="random"` gives the random-dropping baseline: the same protected
tokens and per-layer drop counts, dropped slots chosen at random (drop_prob_l = n_l / candidates_l).
"""

from __future__ import annotations


import torch
from torch import nn

from .hooks import PruneHandle
from .rule import DEFAULT_PROTECT, NothingToPrune, PruningRule, check_prunable

ALLOCATIONS = ("uniform", "global")
NEVER = 3.0e38  # a threshold no signal reaches (JSON has no infinity)
# Measured on the shipped default model (evals/results/odp_curve.json, targets 10-40%): mean held-out
# perplexity 368.28 with the kept weights renormalised, 370.99 without. (The first, weaker model
# preferred no renormalisation by a similar margin: re-measure per model.)
DEFAULT_RENORMALIZE = True


@torch.no_grad()
def collect(model: nn.Module, blocks, windows: torch.Tensor, importance: str = "residual_norm",
            batch_size: int = 8, layerwise: bool = False) -> PruneHandle:
    """Run the model over `windows` [n, seq_len] with nothing pruned, recording signals and ratios.
    layerwise=True drives it one decoder layer at a time in fp32 (calibration.layerwise: the memory
    profile of the quantize pass, for models held in 16-bit or too big for a full forward)."""
    check_prunable(blocks)
    handle = PruneHandle(model, blocks, PruningRule(importance=importance, protect=0.0), collect=True)
    try:
        if layerwise:
            from ..calibration.layerwise import layerwise as run_layerwise

            run_layerwise(model, windows, lambda *_: None, batch_size=batch_size, desc="pruning calibration")
        else:
            for batch in windows.split(batch_size):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return handle


def calibrate(model: nn.Module, blocks, windows: torch.Tensor, target: float, protect: float = DEFAULT_PROTECT,
              importance: str = "residual_norm", renormalize: bool = DEFAULT_RENORMALIZE,
              allocation: str = "uniform", method: str = "ratio", batch_size: int = 8, seed: int = 0,
              collected: PruneHandle | None = None, layerwise: bool = False) -> PruningRule:
    """A PruningRule whose per-layer betas remove `target` (e.g. 0.3 = 30%) of the activated routed-expert
    parameters on `windows`. Pass `collected` (from `collect`) to reuse one calibration pass for many targets."""
    check_prunable(blocks)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if method not in ("ratio", "random"):
        raise ValueError(f"method must be 'ratio' or 'random', got {method!r}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"dynamic pruning target must be in [0, 1), got {target}")
    h = collected if collected is not None else collect(model, blocks, windows, importance, batch_size, layerwise)
    if h.rule.importance != importance:
        raise ValueError(f"collected with importance {h.rule.importance!r}, asked for {importance!r}")

    layers = []  # (name, params per expert, slots, sorted candidate ratios, threshold)
    for layer in h.layers:
        col = layer.collected
        if not col.ratio:
            raise ValueError(f"{layer.name}: no calibration token reached this layer")
        sig = torch.cat(col.signal)
        ratio = torch.cat(col.ratio)
        n_prot = int(round(protect * sig.numel()))
        thr = float(sig.topk(n_prot).values[-1]) if n_prot > 0 else NEVER
        keep = sig < thr
        cand = ratio[keep].flatten()
        cand = cand[torch.isfinite(cand)].sort().values
        layers.append((layer.name, layer.params, layer.counters.slots, cand, thr))

    total = sum(p * slots for _, p, slots, _, _ in layers)
    achievable = sum(p * c.numel() for _, p, _, c, _ in layers) / total
    if target > achievable + 1e-9:
        raise NothingToPrune(f"dynamic pruning target {target:.0%} is out of reach: dropping every non-top expert of "
                             f"every non-protected token removes {achievable:.1%} of activated expert parameters here; "
                             "lower --dynamic-pruning")

    counts: dict[str, int] = {}
    if allocation == "uniform":
        for name, _p, slots, cand, _ in layers:
            counts[name] = min(int(round(target * slots)), cand.numel())
        # rounding may leave the pooled total off by a few slots: fine at calibration sizes
    else:
        vals = torch.cat([c for _, _, _, c, _ in layers])
        w = torch.cat([torch.full((c.numel(),), float(p), dtype=torch.float64) for _, p, _, c, _ in layers])
        order = vals.argsort(stable=True)
        cum = w[order].cumsum(0)
        n = int(torch.searchsorted(cum, torch.tensor(target * total, dtype=torch.float64), right=True))
        if n > 0 and n < cum.numel() and abs(cum[n] - target * total) < abs(cum[n - 1] - target * total):
            n += 1
        beta = _cut(vals[order], n)
        for name, _p, _s, cand, _ in layers:
            counts[name] = int((cand < beta).sum())

    betas, probs = {}, {}
    for name, _p, _s, cand, _ in layers:
        betas[name] = _cut(cand, counts[name])
        probs[name] = counts[name] / cand.numel() if cand.numel() else 0.0
    if allocation == "global":
        shared = max(betas.values()) if method == "ratio" else 0.0
        betas = {name: shared for name in betas}
    est = sum(p * counts[name] for name, p, _, _, _ in layers) / total
    pooled = torch.cat([c for _, _, _, c, _ in layers])
    meta = {"method": "calibrated" if method == "ratio" else "random", "target": target, "allocation": allocation,
            "calibration_tokens": h.layers[0].counters.tokens, "calibration_reduction": round(est, 5),
            "achievable_reduction": round(achievable, 5),
            # how peaked routing is: the median ratio w_j / w_1 of the skippable slots (rule.FLAT_ROUTING)
            "median_ratio": round(float(pooled.median()), 4) if pooled.numel() else None}
    thresholds = {name: thr for name, _p, _s, _c, thr in layers} if protect > 0 else None
    if method == "random":
        return PruningRule(betas={n: 0.0 for n in betas}, protect=protect, importance=importance,
                           thresholds=thresholds, renormalize=renormalize, kind="random", drop_prob=probs,
                           seed=seed, meta=meta)
    return PruningRule(betas=betas, protect=protect, importance=importance, thresholds=thresholds,
                       renormalize=renormalize, meta=meta)


def _cut(sorted_vals: torch.Tensor, n: int) -> float:
    """A beta such that exactly the n smallest values satisfy r < beta (up to ties)."""
    if n <= 0:
        return 0.0
    if n >= sorted_vals.numel():
        return float(sorted_vals[-1]) * (1 + 1e-5) + 1e-12
    lo, hi = float(sorted_vals[n - 1]), float(sorted_vals[n])
    return (lo + hi) / 2 if hi > lo else hi
