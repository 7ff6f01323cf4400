"""Installing a PruningRule on a model: forward pre-hooks that rewrite each MoE layer's top_k_index
(pruned slots -> -1) and weights, before the experts module runs.

Our experts modules (`runtime.experts.Experts`: DenseExperts, PackedExperts) skip indices outside
[0, E): a pruned slot is never computed, and an expert left with no token is not even dequantized.
The transformers experts modules do not skip -1 safely, so on an uncompressed model the experts
module's forward is replaced (instance attribute, removed again by `handle.remove()`) by our
skipping loop over the same parameters: the module tree and state_dict are untouched.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..runtime.experts import DenseExperts, Experts
from .rule import PruningRule, check_prunable

TINY = torch.finfo(torch.float32).tiny


def expert_params(b) -> int:
    """Parameters of one routed expert of block b (gate_up + down matrices and their biases)."""
    ex = b.experts
    if isinstance(ex, DenseExperts):
        n = ex.gate_up[0].numel() + ex.down[0].numel()
    elif isinstance(ex, Experts):
        pair = getattr(ex, "0")
        n = pair.gate_up.out_features * pair.gate_up.in_features + pair.down.out_features * pair.down.in_features
    else:
        n = b.gate_up()[0].numel() + b.down()[0].numel()
    gu_b = getattr(ex, "gate_up_bias", None) if isinstance(ex, Experts) else b.biases()[0]
    d_b = getattr(ex, "down_bias", None) if isinstance(ex, Experts) else b.biases()[1]
    for bias in (gu_b, d_b):
        if bias is not None:
            n += bias[0].numel()
    return int(n)


def shared_params(b) -> int:
    if b.shared is None:
        return 0
    from ..runtime.experts import PackedLinear

    return sum(m.in_features * m.out_features for m in b.shared.modules() if isinstance(m, (nn.Linear, PackedLinear)))


@dataclass
class LayerCounters:
    tokens: int = 0
    slots: int = 0  # tokens x top_k (valid selected slots before pruning)
    kept: int = 0  # slots actually sent to the experts
    protected: int = 0


@dataclass
class Collected:
    """Calibration record of one layer (collect mode: nothing pruned)."""
    signal: list[torch.Tensor] = field(default_factory=list)  # [T] importance signal per token
    ratio: list[torch.Tensor] = field(default_factory=list)  # [T, k] w_j / w_1, +inf where not droppable
    tokens: int = 0


class _Layer:
    def __init__(self, handle: "PruneHandle", b, idx: int):
        self.h, self.b, self.idx = handle, b, idx
        self.name = b.name
        self.counters = LayerCounters()
        self.collected = Collected()
        self.signal: torch.Tensor | None = None  # [B, S] set by the norm hooks of this forward
        self.attention: torch.Tensor | None = None  # [B, S] attention received (importance "attention")
        self.router_logits: torch.Tensor | None = None  # [T, E] from the router of this forward
        self.params = expert_params(b)
        self.shared_params = shared_params(b)


class PruneHandle:
    """Returned by `apply`. `remove()` restores the model; `stats()` reports activated parameters."""

    def __init__(self, model: nn.Module, blocks, rule: PruningRule | None, collect: bool = False):
        self.model, self.blocks, self.rule, self.collect = model, blocks, rule, collect
        self.layers = [_Layer(self, b, i) for i, b in enumerate(blocks) if b.top_k >= 2]
        self._hooks: list = []
        self._forwards: list[nn.Module] = []
        self._gen = torch.Generator().manual_seed(rule.seed if rule else 0)
        self.enabled = True
        try:
            for layer in self.layers:
                self._install(layer)
        except BaseException:
            self.remove()
            raise

    # ---- installation --------------------------------------------------------------------------
    def _install(self, layer: _Layer) -> None:
        b = layer.b
        experts = b.block.experts
        if not isinstance(experts, Experts):
            _override_forward(b, experts)
            self._forwards.append(experts)
        self._hooks.append(b.router.register_forward_hook(
            lambda m, args, out, layer=layer: setattr(layer, "router_logits", _logits(out))))
        self._hooks.append(experts.register_forward_pre_hook(
            lambda m, args, kwargs, layer=layer: self._pre_hook(layer, m, args, kwargs), with_kwargs=True))
        importance = self.rule.importance if self.rule else "residual_norm"
        decoder_layer = _decoder_layer_of(self.model, b.layer_idx)
        norm = getattr(decoder_layer, "post_attention_layernorm", None) if decoder_layer is not None else None
        if norm is not None and importance in ("residual_norm", "attention"):
            self._hooks.append(norm.register_forward_pre_hook(
                lambda m, args, layer=layer: self._residual_hook(layer, args[0])))
        elif norm is not None and importance == "input_norm":
            self._hooks.append(norm.register_forward_hook(
                lambda m, args, out, layer=layer: self._set_signal(layer, out.detach().float().norm(dim=-1))))
        if importance == "attention":
            attn = getattr(decoder_layer, "self_attn", None)
            if attn is None:
                raise ValueError("importance 'attention' needs a self_attn module in each decoder layer")
            self._hooks.append(attn.register_forward_hook(
                lambda m, args, out, layer=layer: self._attention_hook(layer, out)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for experts in self._forwards:
            experts.__dict__.pop("forward", None)
        self._forwards.clear()

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- importance ----------------------------------------------------------------------------
    def _set_signal(self, layer: _Layer, s: torch.Tensor) -> None:
        layer.signal = s.reshape(-1, s.shape[-1]) if s.dim() >= 2 else s.reshape(1, -1)

    def _residual_hook(self, layer: _Layer, x: torch.Tensor) -> None:
        s = x.detach().float().norm(dim=-1)  # [B, S]
        if self.rule is not None and self.rule.importance == "attention":
            att = layer.attention
            layer.attention = None
            if att is None or att.shape != s.shape:
                raise ValueError("importance 'attention' needs attention maps: load the model with eager attention "
                                 "(model.set_attn_implementation('eager')); SDPA does not return them")
            s = s * att
        self._set_signal(layer, s)

    def _attention_hook(self, layer: _Layer, out) -> None:
        w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if w is None:
            layer.attention = None
            return
        received = w.detach().float().sum(dim=(1, 2))  # [B, S_k]
        s_q = w.shape[-2]
        layer.attention = received[:, -s_q:]

    def _protected(self, layer: _Layer, hidden: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal [T], protected [T] bool)."""
        sig = layer.signal
        layer.signal = None
        if sig is None or sig.numel() != T:  # no norm module found: the experts input norm, one sequence
            sig = hidden.detach().float().norm(dim=-1).reshape(1, T)
        rule = self.rule
        flat = sig.reshape(T)
        if rule is None or rule.protect <= 0:
            return flat, torch.zeros(T, dtype=torch.bool, device=flat.device)
        if rule.thresholds:
            return flat, flat >= rule.thresholds[layer.name]
        B, S = sig.shape
        n = int(round(rule.protect * S))
        prot = torch.zeros(B, S, dtype=torch.bool, device=sig.device)
        if n > 0:
            top = sig.topk(n, dim=-1).indices
            prot.scatter_(1, top, True)
        return flat, prot.reshape(T)

    # ---- the rule ------------------------------------------------------------------------------
    def _pre_hook(self, layer: _Layer, module, args, kwargs):
        if not self.enabled:
            return None
        hidden, idx, w, rebuild = _split_args(module, args, kwargs)
        T = idx.shape[0]
        signal, protected = self._protected(layer, hidden, T)
        b = self.blocks[layer.idx]
        if T == 1 and not self.collect and self.rule.kind == "ratio":
            drop = self._one_token(layer, b, idx, w, bool(protected))
        else:
            drop = self._tokens(layer, b, idx, w, signal, protected)
        if drop is None:
            return None
        new_idx = idx.masked_fill(drop, -1)
        new_w = w.masked_fill(drop, 0)
        if self.rule.renormalize:
            scale = w.sum(dim=-1, keepdim=True) / new_w.sum(dim=-1, keepdim=True)
            new_w = torch.where(drop.any(dim=-1, keepdim=True), new_w * scale, new_w)
        return rebuild(hidden, new_idx, new_w)

    def _tokens(self, layer: _Layer, b, idx: torch.Tensor, w: torch.Tensor, signal: torch.Tensor,
                protected: torch.Tensor) -> torch.Tensor | None:
        """[T, k] the slots the rule drops (None: none), counting; in collect mode, records signals and ratios."""
        T = idx.shape[0]
        valid = (idx >= 0) & (idx < b.num_experts)
        score = _scores(b, layer, idx, valid, w)  # -1 where not valid, so the max is the top valid expert
        w1, top = score.max(dim=-1)
        ratio = score / w1.clamp_min(TINY).unsqueeze(1)
        droppable = valid.scatter(1, top.unsqueeze(1), False)  # never the token's top expert
        n_valid = int(valid.sum())
        c = layer.counters
        c.tokens += T
        c.slots += n_valid
        if self.collect:
            col = layer.collected
            col.signal.append(signal.clone())
            col.ratio.append(ratio.masked_fill(~droppable, float("inf")))
            col.tokens += T
            c.kept += n_valid
            return None
        droppable &= ~protected.unsqueeze(1)
        rule = self.rule
        if rule.kind == "random":
            p = rule.drop_prob[layer.name]
            drop = droppable & (torch.rand(idx.shape, generator=self._gen).to(idx.device) < p)
        else:
            drop = droppable & (ratio < rule.betas[layer.name])
        n_drop = int(drop.sum())  # drop is a subset of valid
        c.protected += int(protected.sum())
        c.kept += n_valid - n_drop
        return drop if n_drop else None

    def _one_token(self, layer: _Layer, b, idx: torch.Tensor, w: torch.Tensor, protected: bool) -> torch.Tensor | None:
        """`_tokens` for a single token (a decoding step) on Python scalars: the same float32 arithmetic and
        comparisons, so the same decisions, without its ~20 tensor operations per layer (measured: hooks with
        nothing to prune cost 0.37 ms per layer and token, about a third of an expert's compute on this CPU)."""
        ids = idx[0].tolist()
        E = b.num_experts
        valid = [0 <= e < E for e in ids]
        score = _scores_one(b, layer, ids, valid, w)
        top = max(range(len(ids)), key=score.__getitem__)  # the first maximum, as torch.max
        n_valid = sum(valid)
        c = layer.counters
        c.tokens += 1
        c.slots += n_valid
        c.protected += protected
        if protected:
            c.kept += n_valid
            return None
        w1, beta = max(score[top], np.float32(TINY)), np.float32(self.rule.betas[layer.name])
        drop = [v and j != top and score[j] / w1 < beta for j, v in enumerate(valid)]
        n_drop = sum(drop)
        c.kept += n_valid - n_drop
        return torch.tensor([drop], device=idx.device) if n_drop else None

    # ---- counters ------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        for layer in self.layers:
            layer.counters = LayerCounters()
            layer.collected = Collected()

    def stats(self) -> dict:
        """Activated routed-expert parameters per token, measured on the tokens seen since the last
        reset, against the unpruned count (every selected slot computed)."""
        per_layer, act, full, tokens = {}, 0, 0, 0
        for layer in self.layers:
            c = layer.counters
            per_layer[layer.name] = {"tokens": c.tokens, "slots": c.slots, "kept": c.kept, "protected": c.protected,
                                     "reduction": 1 - c.kept / c.slots if c.slots else 0.0}
            act += c.kept * layer.params
            full += c.slots * layer.params
            tokens = max(tokens, c.tokens)
        shared = sum(layer.shared_params for layer in self.layers)
        n = max(tokens, 1)
        return {
            "tokens": tokens,
            "activated_expert_params_per_token": act / n,
            "unpruned_expert_params_per_token": full / n,
            "reduction": 1 - act / full if full else 0.0,
            "shared_expert_params_per_token": shared,
            "protected_fraction": (sum(layer.counters.protected for layer in self.layers)
                                   / max(sum(layer.counters.tokens for layer in self.layers), 1)),
            "per_layer": per_layer,
        }

    def format_stats(self) -> str:
        s = self.stats()
        line = (f"activated expert parameters per token: {s['activated_expert_params_per_token']:,.0f} measured vs "
                f"{s['unpruned_expert_params_per_token']:,.0f} unpruned ({-s['reduction']:+.1%}) over {s['tokens']:,} "
                f"tokens; {s['protected_fraction']:.1%} of tokens protected")
        if s["shared_expert_params_per_token"]:
            line += f"; shared experts (never pruned): {s['shared_expert_params_per_token']:,} per token"
        return line


def apply(model: nn.Module, blocks, rule: PruningRule) -> PruneHandle:
    """Install `rule` on `model` (whose MoE blocks are `blocks = find_moe_blocks(model)`).
    Raises NothingToPrune for a top-1 model. Returns a handle: `.remove()`, `.stats()`, `.format_stats()`."""
    check_prunable(blocks)
    rule.check_blocks(blocks)
    return PruneHandle(model, blocks, rule)


def observe(model: nn.Module, blocks) -> PruneHandle:
    """Collect mode: record routing-weight ratios and importance signals, prune nothing."""
    check_prunable(blocks)
    return PruneHandle(model, blocks, None, collect=True)


def _logits(out) -> torch.Tensor | None:
    t = out[0] if isinstance(out, tuple) else out
    return t.detach() if isinstance(t, torch.Tensor) and t.dim() == 2 else None


def _scores(b, layer: _Layer, idx: torch.Tensor, valid: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[T, k] the strength of each selected expert that the rule compares: the router's probability
    (softmax or sigmoid of its logits) of that expert. For softmax top-k routers its ratios equal the
    top-k weights' ratios; PhiMoE's sparsemixer weights are ~1 for both experts and carry no preference.
    Falls back to the top-k weights when the router's logits were not seen. Slots that are not valid get -1."""
    logits = layer.router_logits
    layer.router_logits = None
    if logits is None or logits.shape[0] != idx.shape[0]:
        return w.detach().float().masked_fill(~valid, -1.0)
    probs = b.router_probs(logits)
    return probs.gather(1, idx.clamp(0, probs.shape[1] - 1)).masked_fill(~valid, -1.0)


def _scores_one(b, layer: _Layer, ids: list[int], valid: list[bool], w: torch.Tensor) -> list[np.float32]:
    """`_scores` of one token as float32 scalars."""
    logits = layer.router_logits
    layer.router_logits = None
    if logits is None or logits.shape[0] != 1:
        vals = w[0].detach().float().tolist()
        return [np.float32(x) if v else np.float32(-1) for x, v in zip(vals, valid)]
    probs = b.router_probs(logits)[0].tolist()
    return [np.float32(probs[e]) if v else np.float32(-1) for e, v in zip(ids, valid)]


def _decoder_layer_of(model: nn.Module, i: int):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return layers[i] if isinstance(layers, nn.ModuleList) else None


def _split_args(module: nn.Module, args: tuple, kwargs: dict):
    """(hidden, top_k_index, top_k_weights, rebuild) whatever mix of positional and keyword arguments."""
    names = _arg_names(module)
    vals = list(args)
    for name in names[len(vals):3]:
        vals.append(kwargs[name])
    n_pos = len(args)

    def rebuild(hidden, idx, w):
        new = [hidden, idx, w]
        new_args = tuple(new[:n_pos]) + tuple(args[3:])
        new_kwargs = dict(kwargs)
        for i in range(n_pos, 3):
            new_kwargs[names[i]] = new[i]
        return new_args, new_kwargs

    return vals[0], vals[1], vals[2], rebuild


def _arg_names(module: nn.Module) -> list[str]:
    return _forward_arg_names(type(module))


@functools.lru_cache(maxsize=None)
def _forward_arg_names(cls: type) -> list[str]:
    return list(inspect.signature(cls.forward).parameters)[1:4]


def _override_forward(b, experts: nn.Module) -> None:
    """A transformers experts module: where a slot was pruned (-1), run our skipping loop
    (runtime.experts.Experts.forward) over its own parameters, read at call time (views, no copies); a call with
    nothing pruned runs the module's own forward, so it is exactly the unpruned model's computation."""
    names = list(inspect.signature(type(experts).forward).parameters)[1:4]
    own = type(experts).forward

    def forward(*args, **kwargs):
        vals = list(args) + [kwargs[n] for n in names[len(args):3]]
        hidden, idx, w = vals[:3]
        if not bool((idx < 0).any()):
            return own(experts, *args, **kwargs)
        gu_b, d_b = b.biases()
        view = _ViewExperts(b.gate_up(), b.down(), experts._apply_gate, gu_b, d_b)
        return view(hidden, idx, w)

    experts.forward = forward


class _ViewExperts(DenseExperts):
    """DenseExperts over existing tensors without copying the biases."""

    def __init__(self, gate_up, down, apply_gate, gu_b, d_b):
        Experts.__init__(self, gate_up.shape[0], apply_gate)
        self.gate_up, self.down = gate_up, down
        self.gate_up_bias = None if gu_b is None else gu_b.detach()
        self.down_bias = None if d_b is None else d_b.detach()
