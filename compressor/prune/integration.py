"""The few calls the pipeline needs: save a rule into quantization_config, apply a saved rule on load,
find / remove the rule attached to a model (eval --no-dynamic-pruning, the activated-parameters line)."""

from __future__ import annotations

from torch import nn

from ..arch.view import find_moe_blocks
from .hooks import PruneHandle, apply
from .rule import PruningRule

CONFIG_KEY = "pruning"  # quantization_config["pruning"] = PruningRule.to_dict()
_ATTR = "_moe_dynamic_pruning"


def config_entry(rule: PruningRule | None) -> dict:
    """Extra keys for `io.checkpoint.quantization_config(..., extra=...)`; {} when there is no rule."""
    return {} if rule is None else {CONFIG_KEY: rule.to_dict()}


def saved_rule(model: nn.Module) -> PruningRule | None:
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return None
    d = qc.get(CONFIG_KEY) if isinstance(qc, dict) else getattr(qc, CONFIG_KEY, None)
    return None if d is None else PruningRule.from_dict(d)


def attach(model: nn.Module, rule: PruningRule) -> PruneHandle:
    """Apply `rule` and remember the handle on the model (replacing any rule attached before)."""
    detach(model)
    handle = apply(model, find_moe_blocks(model), rule)
    object.__setattr__(model, _ATTR, handle)
    return handle


def attached(model: nn.Module) -> PruneHandle | None:
    return model.__dict__.get(_ATTR)


def detach(model: nn.Module) -> None:
    handle = model.__dict__.pop(_ATTR, None)
    if handle is not None:
        handle.remove()


def apply_saved(model: nn.Module, enabled: bool = True) -> PruneHandle | None:
    """On load: apply the rule saved in the model's quantization_config (None if there is none or
    `enabled` is False, i.e. --no-dynamic-pruning)."""
    rule = saved_rule(model)
    if rule is None or not enabled:
        return None
    return attach(model, rule)


def activation_line(model: nn.Module) -> str:
    """The `eval` line: activated routed-expert parameters per token, measured with the attached rule
    against the unpruned count; without a rule (none saved, or --no-dynamic-pruning), the unpruned count."""
    from .hooks import expert_params

    handle = attached(model)
    if handle is not None:
        return handle.format_stats()
    blocks = find_moe_blocks(model)
    full = sum(b.top_k * expert_params(b) for b in blocks)
    why = "no rule saved" if saved_rule(model) is None else "turned off (--no-dynamic-pruning)"
    if all(b.top_k < 2 for b in blocks):
        why = "top-1 routing, nothing to prune"
    return f"activated expert parameters per token: {full:,} (dynamic pruning {why})"
