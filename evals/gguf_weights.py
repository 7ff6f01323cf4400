"""The routed experts of a GGUF file (llama.cpp's own quantization, say) put into the transformers model they came
from, dequantized exactly as llama.cpp dequantizes them (gguf-py), so that lm-eval tasks and our perplexity run on
those weights with this project's tooling. Only the experts are taken; every other tensor of the GGUF must still be
16/32-bit (the comparisons quantize routed experts only), which is checked.

    model = model_with_gguf_experts(ORIGINAL_DIR, "Q3_K_M.gguf")
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from compressor.arch.view import find_moe_blocks
from compressor.io.models import load_model

FLOAT_TYPES = {"F16", "BF16", "F32"}


def gguf_experts(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """layer -> {"gate"|"up"|"down": float32 [E, rows, in]}; an error if a non-expert tensor is quantized."""
    import gguf

    out: dict[int, dict[str, np.ndarray]] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", t.name)
        if m is None:
            if t.tensor_type.name not in FLOAT_TYPES:
                raise ValueError(f"{path}: {t.name} is {t.tensor_type.name}; only the routed experts may be quantized "
                                 "for this comparison (quantize with the other tensors kept F16)")
            continue
        out.setdefault(int(m[1]), {})[m[2]] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    return out


@torch.no_grad()
def model_with_gguf_experts(original: Path, path: Path, dtype: torch.dtype = torch.float32):
    """The original model (a Mixtral-layout MoE whose gate_up rows are [gate; up]) with its experts replaced by the
    GGUF's."""
    model = load_model(original, dtype)
    experts = gguf_experts(path)
    for b in find_moe_blocks(model):
        e = experts[b.layer_idx]
        gate_up = torch.from_numpy(np.concatenate([e["gate"], e["up"]], axis=1))
        down = torch.from_numpy(e["down"])
        if gate_up.shape != b.gate_up().shape or down.shape != b.down().shape:
            raise ValueError(f"{path}: layer {b.layer_idx}'s experts are {tuple(gate_up.shape)}, {tuple(down.shape)}; "
                             f"the model's are {tuple(b.gate_up().shape)}, {tuple(b.down().shape)}")
        b.gate_up().copy_(gate_up)  # canonical [E, out, in] views of the module's own parameters
        b.down().copy_(down)
    return model
