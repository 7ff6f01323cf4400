"""Discovery of MoE blocks and a canonical view of their experts.

Canonical layout, whatever the storage: per expert an `[out, in]` matrix, as `nn.Linear` holds it:
    gate_up  [E, 2I, H]   rows in the module's own order (gate then up, or interleaved for GPT-OSS;
                          quantization is per output row and grouped along `in`, so row order is
                          irrelevant and the module's own `_apply_gate` reads the output as it expects)
    down     [E, H, I]
Transposed storage (GPT-OSS) is transposed on read and write; nothing is unfused for good.
An MLPMoE (runtime/moe.py, up-cycled from a two-layer MLP anywhere in a model) has gate_up = fc1 [E, I, H_in],
down = fc2 [E, H_out, I], and the MLP's activation as its gate; find_moe_blocks finds it wherever it sits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..runtime.experts import DenseExperts, Experts
from ..runtime.moe import MLPMoE
from .families import MLP_MOE, SUPPORTED_MODEL_TYPES, Family, UnsupportedArchitecture, family_for


@dataclass
class MoEBlock:
    name: str  # module path of the experts module, e.g. "model.layers.3.mlp.experts"
    layer_idx: int  # decoder layer; for MLPMoE blocks, their position among the model's MLPMoE blocks
    family: Family
    block: nn.Module
    router: nn.Module
    experts: nn.Module  # the transformers experts module (or our drop-in replacement)
    shared: nn.Module | None
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.experts, "is_transposed", False))

    @property
    def param_names(self) -> tuple[str, str]:
        """The state-dict names (under `name`) of the gate_up and down weights."""
        return ("gate_up", "down") if isinstance(self.experts, DenseExperts) else ("gate_up_proj", "down_proj")

    def gate_up(self) -> torch.Tensor:  # [E, 2I, H]
        w = getattr(self.experts, self.param_names[0])
        return w.transpose(-1, -2) if self.transposed else w

    def down(self) -> torch.Tensor:  # [E, H, I]
        w = getattr(self.experts, self.param_names[1])
        return w.transpose(-1, -2) if self.transposed else w

    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # [E, 2I], [E, H]
        if isinstance(self.experts, Experts):  # ours
            return self.experts.gate_up_bias, self.experts.down_bias
        return getattr(self.experts, "gate_up_proj_bias", None), getattr(self.experts, "down_proj_bias", None)

    @property
    def apply_gate(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.experts.apply_gate if isinstance(self.experts, Experts) else self.experts._apply_gate

    def router_probs(self, router_logits: torch.Tensor) -> torch.Tensor:  # [T, E]
        if self.family.router_score == "sigmoid":
            return router_logits.float().sigmoid()
        return router_logits.float().softmax(dim=-1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers found at model.model.layers")
    return layers


def layers_prefix(model: nn.Module) -> str:
    return "model.layers" if hasattr(model, "model") else "layers"


def mlp_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MLPMoE blocks of any model (a vision tower's, a projector's), in module order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, MLPMoE)]
    return [MoEBlock(name=f"{n}.experts", layer_idx=k, family=MLP_MOE, block=m, router=m.router, experts=m.experts,
                     shared=None, top_k=m.top_k) for k, (n, m) in enumerate(found)]


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of a supported model, in layer order. Dense layers (DeepSeek's first layers,
    Qwen's mlp_only_layers) have no block and are skipped here. A model holding MLPMoE blocks (up-cycled
    with `upcycle --modules`) may be of any architecture: its blocks are those."""
    config = model.config
    own = mlp_moe_blocks(model)
    if own and config.model_type in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(f"{config.model_type}: a model with both its own MoE layers and up-cycled "
                                      f"MLP blocks ({own[0].name}, ...) is not supported")
    if own:
        return own
    fam = family_for(config.model_type)
    prefix = layers_prefix(model)
    blocks = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, fam.block_attr, None)
        experts = getattr(block, "experts", None)
        if experts is None:
            continue
        if not (hasattr(experts, "gate_up_proj") or isinstance(experts, Experts)):  # ours: packed or dense
            raise UnsupportedArchitecture(
                f"{config.model_type}: layer {i} stores its experts as {type(experts).__name__}, not as fused "
                "gate_up_proj/down_proj tensors; moe-compressor needs transformers>=5, which fuses them")
        blocks.append(
            MoEBlock(
                name=f"{prefix}.{i}.{fam.block_attr}.experts",
                layer_idx=i,
                family=fam,
                block=block,
                router=getattr(block, fam.router_attr),
                experts=experts,
                shared=getattr(block, fam.shared_attr) if fam.shared_attr else None,
                top_k=int(config.num_experts_per_tok),
            )
        )
    if not blocks:
        raise ValueError(f"{config.model_type}: found no MoE block (looked for layers[i].{fam.block_attr}.experts)")
    return blocks


def dense_linears(model: nn.Module, blocks: list[MoEBlock]) -> dict[str, nn.Linear]:
    """The dense FFN linears quantized like dense layers: shared experts and the MLPs of dense layers.
    Attention, embeddings, norms, routers and the LM head stay 16-bit; so does everything but the experts
    in a model holding MLPMoE blocks."""
    fam = blocks[0].family
    if fam is MLP_MOE:
        return {}
    prefix = layers_prefix(model)
    out: dict[str, nn.Linear] = {}
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, fam.block_attr, None)
        owner, path = mlp, f"{prefix}.{i}.{fam.block_attr}"
        if mlp is not None and hasattr(mlp, "experts"):
            owner = getattr(mlp, fam.shared_attr) if fam.shared_attr else None
            path = f"{path}.{fam.shared_attr}"
        if owner is None:
            continue
        for name, mod in owner.named_modules():
            if isinstance(mod, nn.Linear) and mod.weight.numel() > 0:  # a zero-width shared expert has nothing
                out[f"{path}.{name}"] = mod
    return out
