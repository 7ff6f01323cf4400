"""A compressed model as an exporter reads it: loaded packed (nothing dequantized), with each layer's experts
gathered into one stack per projection, the way serving engines store them.

`expert_stack(block, "gate"|"up"|"down")` gives the E experts' rows of that projection in their one shared format;
gate and up are the two halves of this project's fused gate_up rows (or its even and odd rows, for GPT-OSS, whose
module interleaves them). Rows are independent in every format (quantization is per output row, grouped along the
input), so splitting the packed rows is a copy of bytes. `dense_tensors()` gives every other tensor under its
original transformers name, a packed dense linear (a shared expert in a plan's format) as its packed matrix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..arch.view import MoEBlock, find_moe_blocks
from ..errors import UserError
from ..io.models import ModelDirError, is_compressed, load_model, read_config
from ..plan import Plan
from ..quantize.formats import QuantSpec
from ..runtime.experts import PackedExperts, PackedLinear, PackedMatrix

# How each family's fused gate_up rows hold gate and up: the two halves (transformers' `chunk(2)`), or interleaved
# (GPT-OSS's `gate_up[..., ::2]`, `gate_up[..., 1::2]`)
INTERLEAVED_GATE_UP = ("gpt_oss",)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ExportError(UserError, ValueError):
    """A compressed model (or plan) an export format cannot hold; the message names the format, what it supports
    and the fix."""


@dataclass
class ExpertStack:
    """The E experts' rows of one projection of one MoE layer, in the one format they share."""
    name: str                # e.g. "model.layers.3.mlp.experts.gate"
    spec: QuantSpec
    tensors: dict[str, torch.Tensor]  # the packed tensors of each expert stacked: name -> [E, rows, ...]
    in_features: int

    @property
    def format(self) -> str:
        return self.spec.format


@dataclass
class DenseTensor:
    """A tensor outside the routed experts under its transformers name (`...q_proj.weight`): a plain tensor, or
    the packed matrix of a dense linear the plan quantized."""
    name: str
    tensor: torch.Tensor | None = None
    packed: PackedMatrix | None = None


class CompressedModel:
    """A moe-compressor output directory, loaded packed in its checkpoint's dtype."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not is_compressed(self.dir):
            raise ExportError(f"{self.dir} is not a model compressed by moe-compressor (its config.json has no "
                              "quantization_config of ours); export reads the output of `cli.py compress`")
        self.config = read_config(self.dir)
        self.dtype = DTYPES.get(str(self.config.get("dtype")), torch.float16)
        self.model: nn.Module = load_model(self.dir, self.dtype, dynamic_pruning=False)
        self.blocks: list[MoEBlock] = find_moe_blocks(self.model)
        self.plan = Plan.load(self.dir / "plan.json") if (self.dir / "plan.json").is_file() else None
        self.pruning = (self.config["quantization_config"] or {}).get("dynamic_pruning")

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def target(self) -> str:
        return self.plan.target if self.plan is not None else "native"

    def tokenizer_json(self) -> dict:
        path = self.dir / "tokenizer.json"
        if not path.is_file():
            raise ExportError(f"{self.dir} has no tokenizer.json (a fast tokenizer's file), which the export writes "
                              "into the model; compress a model directory that has one")
        return json.loads(path.read_text(encoding="utf-8"))

    def expert_stack(self, b: MoEBlock, projection: str) -> ExpertStack:
        """The E experts' `projection` ("gate", "up" or "down") rows; an error unless they share one format."""
        experts = b.block.experts
        if not isinstance(experts, PackedExperts):
            raise AssertionError(f"{b.name} is not packed")
        part = "down" if projection == "down" else "gate_up"
        mats = [getattr(getattr(experts, str(e)), part) for e in range(b.num_experts)]
        specs = {m.spec for m in mats}
        if len(specs) != 1:
            raise ExportError(f"{b.name}: its experts' {part} matrices are in {len(specs)} formats "
                              f"({', '.join(sorted(s.format for s in specs))}); a serving engine stores a layer's "
                              "experts as one tensor of one type. Compress with --target gguf or --target vllm, whose "
                              "plans give each layer's experts one format")
        rows = self._rows(projection, mats[0].out_features)
        tensors = {n: torch.stack([getattr(m, n)[rows] for m in mats]) for n in mats[0].names}
        return ExpertStack(f"{b.name}.{projection}", mats[0].spec, tensors, mats[0].in_features)

    def expert_bias(self, b: MoEBlock, projection: str) -> torch.Tensor | None:
        """[E, rows] bias of the projection (GPT-OSS), None where the family has none."""
        gu, d = b.biases()
        if projection == "down":
            return d
        return None if gu is None else gu[:, self._rows(projection, gu.shape[-1])]

    def _rows(self, projection: str, out_features: int) -> slice:
        if projection == "down":
            return slice(None)
        half = out_features // 2
        if self.model_type in INTERLEAVED_GATE_UP:
            return slice(0, None, 2) if projection == "gate" else slice(1, None, 2)
        return slice(0, half) if projection == "gate" else slice(half, None)

    def dense_tensors(self) -> list[DenseTensor]:
        """Every tensor but the routed experts', under its transformers name; a tied LM head once (as the
        embedding). Packed dense linears appear once, as `<linear>.weight` with their PackedMatrix."""
        expert_prefixes = tuple(b.name + "." for b in self.blocks)
        packed = {n: m for n, m in self.model.named_modules() if isinstance(m, PackedLinear)}
        out, seen = [], set()
        for name, t in self.model.state_dict(keep_vars=False).items():
            if name.startswith(expert_prefixes) or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            owner = next((p for p in packed if name.startswith(p + ".packed.")), None)
            if owner is not None:
                if name.endswith(".packed." + packed[owner].packed.names[0]):
                    out.append(DenseTensor(owner + ".weight", packed=packed[owner].packed))
                continue
            out.append(DenseTensor(name, tensor=t))
        return out
