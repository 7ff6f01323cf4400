"""One small adapter per MoE family: where its MoE block, router and shared experts live.

Everything else (fused 3D weights, transposed storage, biases, the gate activation) is read off
the transformers experts module itself, which records it (`is_transposed`, `has_bias`,
`_apply_gate`), so a family entry is a few names, not code.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    block_attr: str = "mlp"  # attribute of a decoder layer holding the MoE block
    router_attr: str = "gate"  # attribute of the MoE block holding the router
    shared_attr: str | None = None  # attribute of the MoE block holding the dense shared expert(s)
    router_score: str = "softmax"  # how router logits become per-expert probabilities


FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("mixtral",)),
    Family("qwen2_moe", ("qwen2_moe",), shared_attr="shared_expert"),
    Family("qwen3_moe", ("qwen3_moe",)),
    Family("olmoe", ("olmoe",)),
    Family("deepseek_v2", ("deepseek_v2",), shared_attr="shared_experts"),
    Family("deepseek_v3", ("deepseek_v3",), shared_attr="shared_experts", router_score="sigmoid"),
    Family("granitemoe", ("granitemoe",), block_attr="block_sparse_moe", router_attr="router"),
    Family("phimoe", ("phimoe",), router_attr="router"),
    Family("gpt_oss", ("gpt_oss",), router_attr="router"),
)

# Our MLPMoE (runtime/moe.py), up-cycled from a two-layer MLP anywhere in a model of any type: not a model type.
MLP_MOE = Family("mlp_moe", (), block_attr="", router_attr="router")

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


class UnsupportedArchitecture(UserError, ValueError):
    pass


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r}: moe-compressor supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}. Adding one is a new entry in compressor/arch/families.py. "
        "A dense model of another architecture (a CLIP vision encoder, a LLaVA) gets MoE blocks it can compress "
        "with `cli.py upcycle DIR --modules REGEX`."
    )
