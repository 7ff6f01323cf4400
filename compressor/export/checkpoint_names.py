"""A compressed model's tensors under the names of the family's original checkpoint: what transformers'
save_pretrained writes, and what serving engines' loaders read.

transformers 5 loads a per-expert checkpoint (`...experts.3.w1.weight`, `...experts.3.gate_proj.weight`) into fused
[E, ...] parameters through a conversion mapping, and save_pretrained reverts it with
`transformers.core_model_loading.revert_weight_conversion`; so do we. Reverting a state dict of *markers* (each row of
our fused gate_up and down numbered) tells which rows of which expert every per-expert linear of the original
checkpoint holds, for every family, with no table of ours. Other tensors are renamed the same way (Mixtral's
`.mlp.` back to `.block_sparse_moe.`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.view import MoEBlock
from .source import ExportError


@dataclass(eq=False)
class ExpertLinear:
    """One per-expert linear of the original checkpoint: rows `rows` of expert `expert`'s `part` matrix."""
    module: str          # its module name in the original checkpoint, e.g. "model.layers.0.block_sparse_moe.experts.3.w1"
    block: MoEBlock
    expert: int
    part: str            # "gate_up" or "down": our packed matrix it is cut from
    rows: torch.Tensor   # [out] row indices into that matrix

    @property
    def projection(self) -> str:  # its own name in the checkpoint: w1, gate_proj, down_proj, ...
        return self.module.rsplit(".", 1)[1]


def _rows(b: MoEBlock, part: str) -> int:
    """Rows (output features) of each expert's `part` matrix in a packed block."""
    return getattr(getattr(b.block.experts, "0"), part).out_features


class CheckpointNames:
    """Checkpoint names of a model's routed-expert linears (`experts[block name]`) and of its other tensors
    (`rename(transformers name)`)."""

    def __init__(self, model: torch.nn.Module, blocks: list[MoEBlock], tensor_names: list[str], what: str):
        from transformers.core_model_loading import revert_weight_conversion

        markers, parts = {}, {}
        for i, name in enumerate(tensor_names):  # 1-d markers: renamed, never converted
            markers[name] = torch.tensor([-(i + 1)])
        offset = 0
        for b in blocks:  # the fused parameters as transformers names them, every row numbered across the model
            for part, param in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                rows = _rows(b, part)
                markers[f"{b.name}.{param}"] = torch.arange(offset, offset + b.num_experts * rows).view(-1, rows, 1)
                parts[offset] = (b, part, rows)
                offset += b.num_experts * rows
        reverted = revert_weight_conversion(model, markers)
        starts = sorted(parts)
        self._renamed: dict[str, str] = {}
        self.experts: dict[str, list[ExpertLinear]] = {b.name: [] for b in blocks}
        for name, t in reverted.items():
            v = t.flatten()
            if t.dim() == 1 and t.numel() == 1 and int(v[0]) < 0:
                self._renamed[tensor_names[-int(v[0]) - 1]] = name
                continue
            start = max(s for s in starts if s <= int(v[0]))
            b, part, rows = parts[start]
            expert, local = (v - start) // rows, (v - start) % rows
            if t.dim() != 2 or not name.endswith(".weight") or not bool((expert == expert[0]).all()):
                raise ExportError(
                    f"{what}: this model's original checkpoint stores each layer's experts fused ({name!r}, "
                    f"{tuple(t.shape[:-1])}), not as per-expert linears, so there are no expert linears to write under "
                    "their checkpoint names; run it with this project's runtime")
            self.experts[b.name].append(ExpertLinear(name.removesuffix(".weight"), b, int(expert[0]), part, local))
        for b in blocks:
            self.experts[b.name].sort(key=lambda x: (x.expert, x.part, int(x.rows[0])))
            covered = sum(len(x.rows) for x in self.experts[b.name])
            if covered != b.num_experts * (_rows(b, "gate_up") + _rows(b, "down")):
                raise AssertionError(f"internal error: {b.name}'s checkpoint linears cover {covered} rows")

    def rename(self, name: str) -> str:
        """A tensor's (or, with `.weight` appended by the caller, a module's) name in the original checkpoint."""
        return self._renamed[name]
