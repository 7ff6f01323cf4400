"""A plan against the model it is applied to. Every plan records the model it was made for (`Plan.made_for`: each MoE
block's expert count and matrix shapes, each dense linear's shape); `--plan` is refused, before any work, when that
record, the module names or the expert counts differ from the model's, when it names a format that does not exist or
that a matrix cannot take, or when its formats exceed the budget it records."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .arch.view import MoEBlock
from .errors import PlanError
from .plan import Plan, split_format
from .quantize.formats import ALL_FORMATS, QuantSpec, packable
from .targets import TARGETS, row_widths, target

SHOWN = 4


def made_for(blocks: list[MoEBlock], dense: dict[str, nn.Linear]) -> dict:
    """What a plan records of the model it was made for (shapes only: works on the meta device)."""
    return {"moe_layers": len(blocks),
            "experts": {b.name: {"count": b.num_experts, "gate_up": list(b.gate_up().shape[1:]),
                                 "down": list(b.down().shape[1:])} for b in blocks},
            "dense": {n: [m.out_features, m.in_features] for n, m in dense.items()}}


def check_plan(plan: Plan, blocks: list[MoEBlock], dense: dict[str, nn.Linear], source: str | Path) -> Plan:
    """`plan` (loaded from `source`) if it fits this model; a PlanError naming the difference otherwise."""
    model = made_for(blocks, dense)
    fix = ("a plan applies only to the model it was made for: plan this model (compress --dry-run --output DIR "
           "writes DIR/plan.json) or pass the plan.json made for it")
    problems = _differences("MoE block", set(plan.experts), set(model["experts"]))
    problems += _differences("dense linear", set(plan.dense), set(model["dense"]))
    if not problems:
        problems += [f"{b.name} has {b.num_experts} experts, the plan gives {len(plan.experts[b.name])} formats"
                     for b in blocks if len(plan.experts[b.name]) != b.num_experts]
    if not problems and plan.made_for:
        recorded = plan.made_for.get("experts", {}), plan.made_for.get("dense", {})
        problems += [f"{name}: made for {recorded[0][name]}, the model's is {shape}"
                     for name, shape in model["experts"].items() if recorded[0].get(name, shape) != shape]
        problems += [f"{name}: made for {recorded[1][name]}, the model's is {shape}"
                     for name, shape in model["dense"].items() if recorded[1].get(name, shape) != shape]
    if problems:
        raise PlanError(f"{source} was made for another model ({'; '.join(problems[:SHOWN])}); {fix}")
    _check_formats(plan, blocks, dense, source)
    plan.made_for = model
    return plan


def _differences(what: str, planned: set[str], model: set[str]) -> list[str]:
    out = []
    if planned - model:
        out.append(f"{len(planned - model)} {what}(s) the model does not have, e.g. {sorted(planned - model)[0]}")
    if model - planned:
        out.append(f"{len(model - planned)} {what}(s) of the model it does not plan, e.g. {sorted(model - planned)[0]}")
    return out


def _check_formats(plan: Plan, blocks: list[MoEBlock], dense: dict[str, nn.Linear], source: str | Path) -> None:
    if plan.target not in TARGETS:
        raise PlanError(f"{source}: unknown target {plan.target!r}; a plan's target is one of {', '.join(TARGETS)}")
    allowed = target(plan.target).formats
    bad: list[str] = []
    for b in blocks:
        widths = row_widths(b)
        for e, entry in enumerate(plan.experts[b.name]):
            bad += [f"{b.name} expert {e}: {problem}" for fmt, width in zip(split_format(entry), widths)
                    for problem in _format_problems(fmt, width, plan, allowed)]
    for name, fmt in plan.dense.items():
        extra = ["a dense linear cannot be dropped"] if fmt == "drop" else []
        bad += [f"{name}: {problem}" for problem in extra + _format_problems(fmt, dense[name].in_features, plan, allowed)]
    if bad:
        more = f" ... ({len(bad)} in all)" if len(bad) > SHOWN else ""
        raise PlanError(f"{source}: {'; '.join(bad[:SHOWN])}{more}. Formats are {', '.join(ALL_FORMATS)} (a GGUF type "
                        "only on rows of whole blocks); edit the plan or plan again")


def _format_problems(fmt: str, width: int, plan: Plan, allowed: tuple[str, ...]) -> list[str]:
    if fmt not in ALL_FORMATS:
        return [f"unknown format {fmt[:40]!r}"]
    if fmt not in allowed:
        return [f"format {fmt} is not one target {plan.target} can hold"]
    if not packable(QuantSpec(fmt, plan.group_size, plan.sym), width):
        return [f"format {fmt} cannot store rows of {width} weights"]
    return []


def check_budget(plan: Plan, counted: int, source: str | Path | None) -> None:
    """The bytes the budget counts within the budget the plan records. Over it: the plan was edited (`source`, a
    --plan file, is the user's to fix), or the LP broke its constraint (a bug)."""
    if plan.budget_bytes is None or counted <= plan.budget_bytes:
        return
    if source is None:
        raise AssertionError(f"internal error: the plan takes {counted} bytes of its budget {plan.budget_bytes}")
    raise PlanError(f"{source}: its formats take {counted:,} bytes ({plan.scope}), more than the budget of "
                    f"{plan.budget_bytes:,} bytes it records: it was edited after it was made. Set \"budget_bytes\" to "
                    "null to apply it as it is, or plan again with --budget")
