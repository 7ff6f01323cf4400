"""Online dynamic pruning (MC-MoE's ODP) with calibrated per-layer thresholds.

    from compressor.prune import PruningRule, calibrate, apply, fixed_rule
    rule = calibrate(model, blocks, windows, target=0.3)      # 30% fewer activated expert parameters
    handle = apply(model, blocks, rule)                        # hooks; pruned slots are not computed
    ... model(...) ...
    print(handle.format_stats()); handle.remove()
"""

from .calibrate import ALLOCATIONS, DEFAULT_RENORMALIZE, calibrate, collect
from .hooks import PruneHandle, apply, expert_params
from .integration import CONFIG_KEY, activation_line, apply_saved, attach, attached, config_entry, detach, saved_rule
from .rule import IMPORTANCE_SIGNALS, NothingToPrune, PruningRule, check_prunable, fixed_rule

__all__ = ["CONFIG_KEY", "activation_line", "apply_saved", "attach", "attached", "config_entry", "detach", "saved_rule", "ALLOCATIONS", "DEFAULT_RENORMALIZE", "IMPORTANCE_SIGNALS", "NothingToPrune", "PruneHandle", "PruningRule",
           "apply", "calibrate", "check_prunable", "collect", "expert_params", "fixed_rule"]
