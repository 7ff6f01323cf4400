"""The plan: one format per routed expert and per dense FFN linear. Written as plan.json; `--plan`
reuses one. Pure data (no torch, no transformers)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Plan:
    experts: dict[str, list[str]]  # experts module name -> format of each expert
    dense: dict[str, str]  # dense FFN linear name -> format
    group_size: int = 128
    sym: bool = False
    predicted_bytes: int | None = None  # every tensor the checkpoint will hold
    budget_bytes: int | None = None
    scope: str = "model"
    allocation: dict[str, Any] = field(default_factory=dict)  # solver, seconds, gap, objective, ...
    analysis: dict[str, Any] = field(default_factory=dict)  # per expert: frequency, routing weight, eps, ...

    @classmethod
    def uniform(cls, experts: dict[str, int], dense: list[str], expert_format: str, dense_format: str, **kw) -> "Plan":
        """experts: module name -> number of experts."""
        return cls({n: [expert_format] * e for n, e in experts.items()}, {n: dense_format for n in dense}, **kw)

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
