"""How a layer's calibration inputs reach the passes' observers, and who computes what.

A pass (measure.MeasurePass, apply_plan.QuantizePass) asks its driver for the `calls` of a layer: the experts
modules and dense linears it observes on the layer's calibration inputs. It then learns which experts and linears
it computes (`owned`, `owns`), feeds observers the routed inputs of those (`feed`), computes its share, and completes
the results of the others (`complete_rows`, `share_experts`, `share_linears`, `gather_notes`).

In one process (`LiveCalls`, here) everything is owned, `feed` runs the layer forward with the observers attached
and the completions return what they are given: exactly what the passes did before there were ranks. The
distributed driver (compressor/distributed/) forwards each rank's windows once, routes every expert's routed inputs
to the rank that owns it, and replays them there in the single-process order; the passes' code is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layerwise import LayerInputs

# what a block's batches tell every worker: tokens through the experts module and the sum of squares of its output
OnBatch = Callable[[int, float], None]


@dataclass(frozen=True)
class Owned:
    """The experts of a block (of `total`) that this worker computes, in increasing order."""

    experts: tuple[int, ...]
    total: int

    @classmethod
    def every(cls, total: int) -> "Owned":
        return cls(tuple(range(total)), total)

    @property
    def all(self) -> bool:
        return len(self.experts) == self.total

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The owned experts' rows of `t` [E, ...] (`t` itself when every expert is owned)."""
        return t if self.all else t[list(self.experts)]

    def place(self, rows: torch.Tensor) -> torch.Tensor:
        """[owned, ...] -> [E, ...], zeros where another worker computes (`rows` itself when every expert is owned)."""
        if self.all:
            return rows
        out = rows.new_zeros(self.total, *rows.shape[1:])
        out[list(self.experts)] = rows
        return out

    @property
    def slot(self) -> dict[int, int]:
        """expert -> its row in select(...)"""
        return {e: k for k, e in enumerate(self.experts)}


class LiveCalls:
    """One process: owns every expert and linear; each `feed` runs the layer forward with the observers attached."""

    def __init__(self, layer: nn.Module | None, inputs: LayerInputs | None, experts: dict[str, nn.Module],
                 linears: dict[str, nn.Module] | None = None):
        self.layer, self.inputs, self.experts, self.linears = layer, inputs, experts, linears or {}

    def owned(self, block: str) -> Owned:
        return Owned.every(self.experts[block].num_experts)

    def owns(self, linear: str) -> bool:
        return True

    def feed(self, observers: dict[str, Callable] | None = None, batches: dict[str, OnBatch] | None = None,
             linears: dict[str, Callable] | None = None) -> LayerInputs | None:
        """Runs the layer on its inputs with `observers` (block -> ExpertObserver) on the experts modules, `batches`
        (block -> OnBatch) told each batch, and `linears` (name -> forward hook) on the dense linears; returns the
        layer's outputs (None without inputs)."""
        observers, handles = observers or {}, []
        for name, on_batch in (batches or {}).items():
            handles.append(self.experts[name].register_forward_hook(
                lambda _m, args, out, on_batch=on_batch: on_batch(args[0].shape[0], float(out.float().pow(2).sum()))))
        for name, hook in (linears or {}).items():
            handles.append(self.linears[name].register_forward_hook(hook))
        for name, observer in observers.items():
            self.experts[name].observer = observer
        try:
            return self.inputs.run(self.layer) if self.inputs is not None else None
        finally:
            for h in handles:
                h.remove()
            for name in observers:
                self.experts[name].observer = None  # an observer may refer back to the module: no cycle left

    def complete_rows(self, block: str, rows: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per-expert results [E, ...] whose rows each worker filled for the experts it owns -> complete on every
        worker."""
        return rows

    def share_experts(self, block: str, made: dict[int, tuple[nn.Module, nn.Module]],
                      empty: Callable[[int], tuple[nn.Module, nn.Module]]) -> list[tuple[nn.Module, nn.Module]]:
        """The packed (gate_up, down) of every expert: `made` for the owned ones; the others' come from their owners,
        loaded into `empty(e)`."""
        return [made[e] for e in range(len(made))]

    def share_linears(self, made: dict[str, nn.Module], empty: Callable[[str], nn.Module]) -> dict[str, nn.Module]:
        """The packed replacement of every dense linear (see share_experts)."""
        return made

    def gather_notes(self, notes: list[str]) -> list[str]:
        """Report lines (fallbacks) of every worker."""
        return notes


class InProcess:
    """The driver as the passes see it, in one process."""

    def calls(self, layer: nn.Module | None, inputs: LayerInputs | None, experts: dict[str, nn.Module],
              linears: dict[str, nn.Module] | None = None) -> LiveCalls:
        return LiveCalls(layer, inputs, experts, linears)


IN_PROCESS = InProcess()
