"""The plan: one format per routed expert and per dense FFN linear. Written as plan.json; `--plan`
reuses one. Pure data (no torch, no transformers)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


PROJECTIONS = ("gate_up", "down")


def split_format(entry: str) -> tuple[str, str]:
    """An expert's plan entry -> (gate_up format, down format). "q4_k" gives both projections q4_k; "q4_0+q6_k"
    gives gate_up q4_0 and down q6_k (targets whose formats depend on a matrix's width or that choose per
    projection: targets.py)."""
    gu, _, down = entry.partition("+")
    return gu, down or gu


def join_formats(gate_up: str, down: str) -> str:
    """Inverse of split_format."""
    return gate_up if gate_up == down else f"{gate_up}+{down}"


@dataclass
class Plan:
    experts: dict[str, list[str]]  # experts module name -> format of each expert ("gate_up+down" when they differ)
    dense: dict[str, str]  # dense FFN linear name -> format
    group_size: int = 128
    sym: bool = False
    scale_dtype: str = "float16"  # the int scales' values (quantize/scales.round_scales): float16 or bfloat16
    predicted_bytes: int | None = None  # every tensor the checkpoint will hold
    budget_bytes: int | None = None
    scope: str = "model"
    target: str = "native"  # where the model will run (targets.py): native, gguf or vllm
    allocation: dict[str, Any] = field(default_factory=dict)  # solver, seconds, gap, objective, ...
    analysis: dict[str, Any] = field(default_factory=dict)  # per expert: frequency, routing weight, eps, ...

    @classmethod
    def uniform(cls, experts: dict[str, int], expert_format: str, dense: dict[str, str], **kw) -> "Plan":
        """experts: module name -> number of experts; dense: dense linear name -> format."""
        return cls({n: [expert_format] * e for n, e in experts.items()}, dict(dense), **kw)

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for formats in self.experts.values():
            for f in formats:
                counts[f] = counts.get(f, 0) + 1
        return counts

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}")
        data = json.loads(path.read_text())
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"{path} is not a plan.json written by moe-compressor: {err}") from None
