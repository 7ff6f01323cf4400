"""Dense Llama-style causal LM -> MoE in a standard transformers layout (no remote code).

Layouts (attention, norms, embeddings and head are copied unchanged; names are identical):
  plain (CuMo co-up-cycling), no shared expert, every layer  -> Mixtral
      every expert = the pretrained MLP; Mixtral renormalises the top-k softmax weights to sum to 1,
      so with identical experts the step-0 logits equal the dense model's (to float rounding).
  shared expert (MoTE), or a --modules subset               -> Qwen2-MoE (qkv_bias=False == Llama attention)
      shared_expert = the pretrained FFN; routed experts start from it; norm_topk_prob=False so the
      routed output is p_top * expert(x) and the router learns from the LM loss even at top-1.
      Qwen2-MoE multiplies the shared output by sigmoid(shared_expert_gate(x)): we set that gate to 0
      (sigmoid = 1/2, exact) and store 2 * W_down in the shared expert, so the shared output is the
      dense FFN bit for bit and is simply *added* to the routed output, as in MoTE. train() keeps the
      gate frozen at 0 unless told otherwise. Layers outside --modules stay dense (mlp_only_layers).
      Without --shared-expert the shared expert has intermediate size 0 (outputs 0).
  DeepSeek-V2/V3 would add the shared output with no gate, but their attention is MLA (a latent KV
  with an RMSNorm inside and one shared rope key), which cannot represent Llama's attention.

Ternary routed experts (MoTE): experts.gate_up_proj / down_proj get a TernarySTE parametrization
(latent fp weights, ternary forward). `bake_ternary` replaces them by their ternary values for saving.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UserError
from ..quantize.formats import DEFAULT_GROUP_SIZE
from .ternary import TernarySTE

SUPPORTED_DENSE = ("llama",)  # other architectures: two-layer MLPs anywhere become MLPMoE blocks (modules.py)
DEFAULT_TOP_K = 2  # CuMo's top-2; MoTE (with a shared expert) routes top-1
COPIED_CONFIG = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
                 "rope_parameters", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")



class UpcycleError(UserError, ValueError):
    """Bad input to up-cycling; the message names the problem and the fix."""

def mlp_names(dense: nn.Module) -> list[str]:
    return [f"model.layers.{i}.mlp" for i in range(len(dense.model.layers))]


def select_layers(dense: nn.Module, modules: str | None) -> list[int]:
    """Indices of the decoder layers whose MLP matches the regex `modules` (re.search on
    'model.layers.<i>.mlp'); all of them when None."""
    names = mlp_names(dense)
    if modules is None:
        return list(range(len(names)))
    chosen = [i for i, n in enumerate(names) if re.search(modules, n)]
    if not chosen:
        raise UpcycleError(f"--modules {modules!r} matches no MLP; the MLPs are named like {names[0]!r}")
    return chosen


def _check_dense(dense: nn.Module) -> None:
    c = dense.config
    if c.model_type not in SUPPORTED_DENSE:
        raise UpcycleError(f"upcycle supports dense {', '.join(SUPPORTED_DENSE)} models, got {c.model_type!r}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise UpcycleError("upcycle: attention_bias / mlp_bias models have no bias-free MoE layout to go to")
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        raise UpcycleError(f"upcycle: head_dim {c.head_dim} != hidden_size / heads; not supported by the MoE layouts")


def moe_config(dense_config, experts: int, top_k: int, shared_expert: bool, layers: list[int]):
    """The MoE config for a dense Llama config (see the module docstring for the choice of layout)."""
    from transformers import AutoConfig

    common = {k: getattr(dense_config, k) for k in COPIED_CONFIG if hasattr(dense_config, k)}
    I, L = dense_config.intermediate_size, dense_config.num_hidden_layers
    if not shared_expert and len(layers) == L:
        return AutoConfig.for_model("mixtral", **common, intermediate_size=I, num_local_experts=experts,
                                    num_experts_per_tok=top_k, head_dim=dense_config.head_dim, sliding_window=None)
    return AutoConfig.for_model("qwen2_moe", **common, intermediate_size=I, moe_intermediate_size=I,
                                shared_expert_intermediate_size=I if shared_expert else 0, num_experts=experts,
                                num_experts_per_tok=top_k, norm_topk_prob=not shared_expert, qkv_bias=False,
                                use_sliding_window=False, decoder_sparse_step=1,
                                mlp_only_layers=[i for i in range(L) if i not in layers])


@torch.no_grad()
def drop_neurons(gate_up: torch.Tensor, down: torch.Tensor, ratio: float, gen: torch.Generator) -> None:
    """Drop-Upcycling (Nakamura et al., ICLR 2025), in place on fused experts gate_up [E, 2I, H], down [E, H, I]
    that all start as one FFN: in each expert an independent random `ratio` of the I intermediate neurons is
    re-initialised, its gate and up rows drawn from N(mean, std) of that expert's gate (or up) matrix, so the
    experts start apart and can specialise. Unlike the paper, the neurons' down columns are set to 0 rather
    than redrawn: the model starts as the FFN minus the dropped neurons (no added noise) and training grows them
    back (measured on SmolLM2-135M at ratio 0.1: held-out perplexity x1.4 at step 0, against x2 with
    redrawn down columns)."""
    if not 0.0 <= ratio <= 1.0:
        raise UpcycleError(f"drop ratio must be in [0, 1], got {ratio} (--drop-ratio)")
    E, I2, H = gate_up.shape
    I = I2 // 2
    n = round(ratio * I)
    for e in range(E):
        idx = torch.randperm(I, generator=gen)[:n]
        for half in (0, I):  # gate rows, then up rows
            part = gate_up[e, half:half + I]
            mean, std = float(part.mean()), float(part.std())
            part[idx] = torch.randn(n, H, generator=gen, dtype=part.dtype) * std + mean
        down[e][:, idx] = 0.0


@torch.no_grad()
def upcycle(dense_model: nn.Module, experts: int = 8, top_k: int | None = None, ternary: bool = False,
            shared_expert: bool = False, modules: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
            router_std: float = 0.02, seed: int = 0, drop_ratio: float = 0.0) -> nn.Module:
    """Dense LlamaForCausalLM -> MixtralForCausalLM / Qwen2MoeForCausalLM (float32, train mode off).

    top_k defaults to 1 with a shared expert (MoTE) and to 2 without (CuMo). Routers are initialised
    N(0, router_std) (seeded) to break the symmetry of identical experts. With `ternary`, routed experts
    carry a TernarySTE parametrization (latent weights = the FFN); call bake_ternary before saving.
    `drop_ratio` > 0 re-initialises that share of each routed expert's neurons (drop_neurons), so the experts
    differ in weight from the start; the step-0 model is then no longer the dense one and needs training."""
    from transformers import AutoModelForCausalLM

    _check_dense(dense_model)
    top_k = top_k or (1 if shared_expert else DEFAULT_TOP_K)
    if not 1 <= top_k <= experts:
        raise UpcycleError(f"top_k must be in [1, experts={experts}], got {top_k}: pass --top-k, or more --experts")
    layers = select_layers(dense_model, modules)
    config = moe_config(dense_model.config, experts, top_k, shared_expert, layers)
    moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = {k: v.float() for k, v in dense_model.state_dict().items()}
    own = moe.state_dict()
    for k, v in sd.items():  # embeddings, attention, norms, head; dense MLPs of unselected layers
        if k in own and own[k].shape == v.shape:
            own[k].copy_(v)
    gen = torch.Generator().manual_seed(seed)
    for i in layers:
        mlp = dense_model.model.layers[i].mlp
        wg, wu, wd = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        block = moe.model.layers[i].mlp
        block.experts.gate_up_proj.copy_(torch.cat([wg, wu])[None].expand(experts, -1, -1))  # [E, 2I, H]
        block.experts.down_proj.copy_(wd[None].expand(experts, -1, -1))  # [E, H, I]
        if drop_ratio:
            drop_neurons(block.experts.gate_up_proj, block.experts.down_proj, drop_ratio, gen)
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=gen) * router_std)
        if hasattr(block, "shared_expert"):
            block.shared_expert_gate.weight.zero_()  # sigmoid(0) = 1/2, frozen: the shared output is added
            block.shared_expert_gate.weight.requires_grad_(False)
            if shared_expert:
                block.shared_expert.gate_proj.weight.copy_(wg)
                block.shared_expert.up_proj.weight.copy_(wu)
                block.shared_expert.down_proj.weight.copy_(2 * wd)  # ... times 2: the dense FFN, exactly
        if ternary:
            for name in ("gate_up_proj", "down_proj"):
                parametrize.register_parametrization(block.experts, name, TernarySTE(group_size))
    moe.eval()
    return moe


def ternary_experts(model: nn.Module) -> list[nn.Module]:
    """Experts modules carrying a TernarySTE parametrization."""
    return [m for m in model.modules() if parametrize.is_parametrized(m)
            and any(isinstance(p, TernarySTE) for plist in m.parametrizations.values() for p in plist)]


@torch.no_grad()
def bake_ternary(model: nn.Module) -> nn.Module:
    """In place: replace each parametrized expert weight by its ternary value (the standard layout
    save_pretrained writes). The latent weights are gone afterwards."""
    for m in ternary_experts(model):
        for name in list(m.parametrizations):
            parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return model


def shared_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a Qwen2-MoE block adds for its shared expert: sigmoid(gate(x)) * shared_expert(x)."""
    return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
