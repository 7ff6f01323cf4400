"""upcycle: dense Llama-style LM -> MoE (CuMo co-up-cycling, MoTE ternary routed experts + shared FFN);
two-layer MLPs of any model (CLIP vision encoder, LLaVA projector) -> MLPMoE blocks.

ternary   ternarize, TernarySTE, is_ternary                    torch only
build     upcycle, bake_ternary, moe_config, shared_output        builds transformers models
modules   upcycle_modules, mlp_modules, select_modules            MLPMoE blocks in place, any architecture
train     train (LM + per-layer balance loss, checkpoints, resume)
command   upcycle_cli                                             load -> upcycle -> train -> save
"""
from .build import UpcycleError, bake_ternary, moe_config, shared_output, ternary_experts, upcycle
from .command import checkpoint_dir_for, upcycle_cli
from ..quantize.ternary import is_ternary
from .modules import mlp_modules, select_modules, upcycle_modules
from .ternary import TernarySTE, ternarize
from .train import TrainResult, balance_loss, train
