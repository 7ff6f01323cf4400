"""Exact byte accounting: what a checkpoint holds, by component, and what a plan will write.

Bytes are tensor bytes (safetensors headers excluded), tied tensors counted once. The prediction
for a plan and the bytes of the written checkpoint come from the same table, so they agree to the
byte (a test checks it against the files)."""

from __future__ import annotations

import torch
from torch import nn

from ..arch.view import MoEBlock
from ..plan import Plan, split_format
from ..quantize.formats import QuantSpec, packable, packed_nbytes
from ..runtime.experts import PackedMatrix

COMPONENTS = ("experts", "shared_experts", "attention", "embeddings", "other")


def component_of(name: str, expert_prefixes: tuple[str, ...], dense_prefixes: tuple[str, ...]) -> str:
    if name.startswith(expert_prefixes):
        return "experts"
    if name.startswith(dense_prefixes):
        return "shared_experts"
    if "attn" in name or "attention" in name:
        return "attention"
    if "embed" in name or name.startswith("lm_head"):
        return "embeddings"
    return "other"


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (e.g. lm_head tied to embed_tokens) kept once. Works on the
    meta device too: ties are read off the module tree, not off storage pointers."""
    keep = {n for n, _ in model.named_parameters()}  # shared parameters appear once
    for mod_name, mod in model.named_modules():
        for b in mod._buffers:
            if b not in mod._non_persistent_buffers_set and mod._buffers[b] is not None:
                keep.add(f"{mod_name}.{b}" if mod_name else b)
    return {k: v for k, v in model.state_dict().items() if k in keep}


def packed_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, PackedMatrix))


def checkpoint_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Exactly the tensors to write: packed buffers as they are, every other float tensor in `dtype`."""
    packed = packed_prefixes(model)
    out = {}
    for name, t in unique_state(model).items():
        if not name.startswith(packed) and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def bytes_by_component(tensors: dict[str, int], expert_prefixes, dense_prefixes) -> dict[str, int]:
    out = dict.fromkeys(COMPONENTS, 0)
    for name, nbytes in tensors.items():
        out[component_of(name, tuple(expert_prefixes), tuple(dense_prefixes))] += nbytes
    return out


def predict_bytes(model: nn.Module, blocks: list[MoEBlock], dense: dict[str, nn.Linear], plan: Plan,
                  dtype: torch.dtype) -> dict[str, int]:
    """Bytes by tensor name that `plan` will write, from the unquantized model's shapes alone."""
    expert_params = {f"{b.name}.{p}" for b in blocks for p in b.param_names}
    dense_weights = {f"{n}.weight" for n in dense}
    out: dict[str, int] = {}
    for name, t in unique_state(model).items():
        if name in expert_params or name in dense_weights:
            continue
        out[name] = t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    for b in blocks:
        for e, fmt in enumerate(plan.experts[b.name]):
            out[f"{b.name}.{e}"] = expert_matrix_bytes(b, fmt, plan.group_size, plan.sym)
    for name, lin in dense.items():
        out[f"{name}.packed"] = packed_nbytes(QuantSpec(plan.dense[name], plan.group_size, plan.sym),
                                              lin.out_features, lin.in_features)
    return out


def expert_matrix_bytes(b: MoEBlock, fmt: str, group_size: int, sym: bool, strict: bool = True) -> int:
    """Bytes of one expert of block `b` in plan entry `fmt` (gate_up + down)."""
    return sum(projection_bytes(b, fmt, group_size, sym, strict))


def projection_bytes(b: MoEBlock, fmt: str, group_size: int, sym: bool, strict: bool = True) -> tuple[int, int]:
    """Bytes of one expert's gate_up and of its down in plan entry `fmt` ("int4", or "q4_0+q6_k"). A format that
    cannot hold a matrix (ggml blocks that do not divide its rows) is an error, or 0 bytes with strict=False (the LP
    gives it an infinite cost)."""
    _, I2, H = b.gate_up().shape
    O, I = b.down().shape[-2:]  # O = H, except for an MLPMoE whose output width differs from its input

    def nbytes(f: str, out: int, n: int) -> int:
        spec = QuantSpec(f, group_size, sym)
        return packed_nbytes(spec, out, n) if strict or packable(spec, n) else 0

    f_gu, f_d = split_format(fmt)
    return nbytes(f_gu, I2, H), nbytes(f_d, O, I)
