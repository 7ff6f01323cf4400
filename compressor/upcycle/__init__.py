"""upcycle: dense Llama-style LM -> MoE (CuMo co-up-cycling, MoTE ternary routed experts + shared FFN).

ternary   ternarize, TernarySTE, is_ternary                    torch only
build     upcycle, bake_ternary, moe_config, shared_output        builds transformers models
train     train (LM + per-layer balance loss, checkpoints, resume)
command   upcycle_cli                                             load -> upcycle -> train -> save
"""
from .build import bake_ternary, moe_config, shared_output, ternary_experts, upcycle
from .command import checkpoint_dir_for, upcycle_cli
from ..quantize.ternary import is_ternary
from .ternary import TernarySTE, ternarize
from .train import TrainResult, balance_loss, train
