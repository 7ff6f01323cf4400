"""The online dynamic pruning rule (MC-MoE's ODP, with calibrated per-layer thresholds).

For each token and MoE layer with top-k >= 2: a selected expert j other than the token's top expert
is dropped when its routing weight is small against the top one, w_j < beta_l * w_1, unless the
token is important. w is the router's probability of the selected expert (softmax, or sigmoid for
DeepSeek-V3): for softmax top-k routers its ratios are exactly the top-k weights' ratios; PhiMoE's
sparsemixer weights are ~1 for both experts and would make the rule blind. A dropped slot's index
becomes -1, which our experts modules skip (no compute).

Token importance works with SDPA attention (no attention maps):
    residual_norm  L2 norm of the residual stream entering the MoE block (the input of
                   `post_attention_layernorm`); tokens with massive residual norms (BOS, delimiters:
                   the "attention sink" tokens) are the ones attention concentrates on.
    input_norm     L2 norm of the MoE block's (normalized) input.
    attention      MC-MoE's signal: attention received (summed over heads and queries) x residual
                   norm. Needs eager attention maps; offered for comparison only.
A token is protected when its signal is at least the layer's calibrated threshold (the
(1 - protect) quantile of the signal on calibration text; works token by token, so also in
generation), or, without thresholds, when it is among the top `protect` fraction of its sequence
in the current forward (MC-MoE's per-sequence ranking).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError

IMPORTANCE_SIGNALS = ("residual_norm", "input_norm", "attention")
KINDS = ("ratio", "random")
RULE_VERSION = 1


class NothingToPrune(UserError, ValueError):
    """The model routes each token to a single expert: there is no weaker expert to drop."""


def check_prunable(blocks, target: float | None = None, protect: float = 0.0) -> None:
    """Is there anything to prune, and (with `target`) can that share of activated expert parameters be skipped at
    all? At most k-1 of a token's k experts are skipped, and never for the `protect` share of tokens."""
    if not blocks:
        raise NothingToPrune("dynamic pruning: the model has no MoE block, so there is nothing to prune")
    top1 = [b.name for b in blocks if b.top_k < 2]
    if len(top1) == len(blocks):
        raise NothingToPrune(
            f"dynamic pruning: this model routes each token to top-{blocks[0].top_k} expert(s) in every MoE layer; "
            "pruning only drops a token's weaker experts next to its top one, so with top-1 routing there is "
            "nothing to prune (run without --dynamic-pruning)")
    ceiling = max((b.top_k - 1) / b.top_k for b in blocks) * (1 - protect)
    if target is not None and target > ceiling:
        raise NothingToPrune(f"dynamic pruning target {target:.0%} is out of reach: at most top-k - 1 of a token's "
                             f"experts are skipped, and never for the {protect:.0%} most important tokens, so at most "
                             f"{ceiling:.1%} of activated expert parameters here; lower --dynamic-pruning")


DEFAULT_PROTECT = 0.02  # MC-MoE: the top 2% most important tokens are never pruned
# Routing this flat (the median skippable expert carries at least this share of the top expert's weight) leaves the
# rule nothing cheap to skip. Measured: median ratio 0.54 on the default model (14% fewer activated parameters for
# +0.47% perplexity) against 0.95 on reference-moe-drop (10% fewer for +3.5%; README, "Online dynamic pruning").
FLAT_ROUTING = 0.8

@dataclass
class PruningRule:
    """Per-layer thresholds keyed by the MoE block name (`MoEBlock.name`, e.g. model.layers.3.mlp.experts).

    kind "ratio":  drop slot j (not the top) of a non-protected token when w_j < betas[layer] * w_1.
    kind "random": the random-dropping baseline: drop such a slot with probability drop_prob[layer].
    thresholds:    importance threshold per layer (protected when signal >= threshold); None -> rank mode.
    renormalize:   rescale the kept weights of a pruned token to the original sum of its top-k weights.
    """

    betas: dict[str, float] = field(default_factory=dict)
    protect: float = DEFAULT_PROTECT
    importance: str = "residual_norm"
    thresholds: dict[str, float] | None = None
    renormalize: bool = False
    kind: str = "ratio"
    drop_prob: dict[str, float] | None = None
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: target, allocation, calibration numbers
    version: int = RULE_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"pruning rule: kind {self.kind!r} is not one of {KINDS}")
        if self.importance not in IMPORTANCE_SIGNALS:
            raise ValueError(f"pruning rule: importance {self.importance!r} is not one of {IMPORTANCE_SIGNALS}")
        if not 0.0 <= self.protect < 1.0:
            raise ValueError(f"pruning rule: protect must be in [0, 1), got {self.protect}")
        for name, b in self.betas.items():
            if not (isinstance(b, (int, float)) and math.isfinite(b) and b >= 0):
                raise ValueError(f"pruning rule: beta for {name} must be a finite number >= 0, got {b!r}")
        if self.kind == "random":
            if not self.drop_prob:
                raise ValueError("pruning rule: kind 'random' needs drop_prob per layer")
            for name, p in self.drop_prob.items():
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"pruning rule: drop_prob for {name} must be in [0, 1], got {p}")
        if self.version > RULE_VERSION:
            raise ValueError(f"pruning rule version {self.version} is newer than this moe-compressor "
                             f"understands ({RULE_VERSION}); upgrade moe-compressor")

    def layers(self) -> list[str]:
        return list(self.drop_prob if self.kind == "random" else self.betas)

    def check_blocks(self, blocks) -> None:
        """Every MoE block of the model must have an entry (a rule from another model fails loudly)."""
        names = {b.name for b in blocks if b.top_k >= 2}
        missing = sorted(names - set(self.layers()))
        extra = sorted(set(self.layers()) - {b.name for b in blocks})
        if missing or extra:
            raise ValueError(f"pruning rule does not match this model: no entry for {missing[:3]}, "
                             f"entries for unknown layers {extra[:3]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruningRule":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"pruning rule: unknown keys {unknown}")
        d = dict(d)
        for key in ("betas", "thresholds", "drop_prob"):
            if d.get(key) is not None:
                d[key] = {str(k): float(v) for k, v in d[key].items()}
        return cls(**d)

    def describe(self) -> str:
        vals = self.drop_prob if self.kind == "random" else self.betas
        what = "p" if self.kind == "random" else "beta"
        per_layer = ", ".join(f"{_short(n)}: {v:.3g}" for n, v in vals.items())
        prot = (f"protect {self.protect:.1%} by {self.importance}"
                + (" (calibrated thresholds)" if self.thresholds else " (per-sequence rank)"))
        target = self.meta.get("target")
        head = f"dynamic pruning ({self.kind}" + (f", target {target:.0%}" if target is not None else "") + ")"
        line = f"{head}: {what} {per_layer}; {prot}; renormalize {self.renormalize}"
        median = self.meta.get("median_ratio")
        if median is not None and median >= FLAT_ROUTING:
            line += (f"\nnote: this model's routing is flat: the median skippable expert carries {median:.0%} of the "
                     "top expert's routing weight, so each skip removes about as much as it keeps; expect a real quality "
                     "cost (measure it: cli.py eval --ppl, then --no-dynamic-pruning)")
        return line


def _short(name: str) -> str:
    parts = name.split(".")
    return f"L{parts[2]}" if len(parts) > 2 and parts[1] == "layers" else name


def fixed_rule(blocks, beta: float, protect: float = DEFAULT_PROTECT, importance: str = "residual_norm",
               thresholds: dict[str, float] | None = None, renormalize: bool = False) -> PruningRule:
    """MC-MoE's baseline: one hand-set beta for every layer (no calibration). Without `thresholds`,
    important tokens are the top `protect` fraction of each sequence (MC-MoE's ranking)."""
    check_prunable(blocks)
    return PruningRule(betas={b.name: float(beta) for b in blocks if b.top_k >= 2}, protect=protect,
                       importance=importance, thresholds=thresholds, renormalize=renormalize,
                       meta={"method": "fixed", "beta": float(beta)})
