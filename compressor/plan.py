"""The plan: one format per routed expert and per dense FFN linear. Written as plan.json; `--plan`
reuses one. Pure data (no torch, no transformers)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import MissingFile, PlanError


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
    made_for: dict[str, Any] = field(default_factory=dict)  # the model's MoE blocks and dense linears (plan_check.py)

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

    def budget_line(self) -> str:
        """The checkpoint's bytes, and beside the budget the bytes it counts (`allocation["budget_counts"]`; scope
        experts: the routed experts only, a part of the total)."""
        total = f"checkpoint {self.predicted_bytes:,} bytes"
        counted = self.allocation.get("budget_counts")
        if self.budget_bytes is None or counted is None:
            return total
        if self.scope == "model":
            return f"{total}, budget {self.budget_bytes:,} (scope model)"
        return f"routed experts {counted:,} bytes, budget {self.budget_bytes:,} (scope experts); {total} in all"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """A plan.json, its fields checked for their types (what they mean for a model: plan_check.py)."""
        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"plan file not found: {path}")
        what = "pass a plan.json written by `compress` (or `compress --dry-run`)"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:  # also UnicodeDecodeError
            raise PlanError(f"{path} is not JSON ({str(err)[:80]}); {what}") from None
        if not isinstance(data, dict):
            raise PlanError(f"{path} holds a JSON {type(data).__name__}, not a plan (a JSON object); {what}")
        try:
            plan = cls(**data)
        except TypeError as err:
            raise PlanError(f"{path} is not a plan.json written by moe-compressor ({str(err)[:120]}); {what}") from None
        problems = plan._type_problems()
        if problems:
            raise PlanError(f"{path} is not a valid plan: {'; '.join(problems[:3])}; {what}")
        return plan

    def _type_problems(self) -> list[str]:
        def strings(d, values) -> bool:
            return isinstance(d, dict) and all(isinstance(k, str) and values(v) for k, v in d.items())

        checks = [
            ("experts", strings(self.experts, lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v)),
             "an object of module name -> list of format names"),
            ("dense", strings(self.dense, lambda v: isinstance(v, str)), "an object of module name -> format name"),
            ("group_size", type(self.group_size) is int and self.group_size >= 1, "a positive integer"),
            ("sym", isinstance(self.sym, bool), "true or false"),
            ("scope", self.scope in ("model", "experts"), "'model' or 'experts'"),
            ("target", isinstance(self.target, str), "a target name"),
            ("budget_bytes", self.budget_bytes is None or (type(self.budget_bytes) is int and self.budget_bytes > 0),
             "a positive integer or null"),
            ("predicted_bytes", self.predicted_bytes is None or type(self.predicted_bytes) is int, "an integer or null"),
            ("allocation", isinstance(self.allocation, dict), "an object"),
            ("analysis", isinstance(self.analysis, dict), "an object"),
            ("made_for", isinstance(self.made_for, dict), "an object"),
        ]
        return [f"{name!r} must be {want}" for name, ok, want in checks if not ok]
