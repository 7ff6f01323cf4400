"""The driver of a compress in one process: what the pipeline asks of a driver, answered for a single worker.

The pipeline (pass1.py, pass2.py) runs the same code in one process and on each rank of a torchrun launch; where the
two differ it asks its driver: on which device layers run, which calibration windows this worker forwards, the calls
of a layer (calibration/calls.py), what only one worker does (the LP, the journals and the measurement cache, the
output), the layer sensitivity, and what each worker did for the report. compressor/distributed/driver.py is the
same interface for ranks.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ..calibration.calls import LiveCalls
from ..calibration.layerwise import LayerInputs, in_memory
from ..calibration.sensitivity import layer_sensitivity
from ..device import resolve
from ..io.report import peak_rss_mb


class LocalDriver:
    rank, world_size, is_lead = 0, 1, True

    def __init__(self, device: torch.device):
        self.device, self.t0, self.windows_seen = device, time.time(), 0

    @classmethod
    def for_recipe(cls, recipe) -> "LocalDriver":
        return cls(resolve(recipe.execution.device))

    def check(self, image_path: bool) -> None:
        """Refuses what this driver cannot run (a single process runs everything)."""

    def calls(self, layer: nn.Module | None, inputs: LayerInputs | None, experts: dict[str, nn.Module],
              linears: dict[str, nn.Module] | None = None) -> LiveCalls:
        return LiveCalls(layer, inputs, experts, linears)

    def windows(self, windows: torch.Tensor | None) -> torch.Tensor | None:
        """The calibration windows this worker forwards: all of them."""
        if windows is not None:
            self.windows_seen = windows.shape[0]
        return windows

    def lead(self, fn: Callable, encode: Callable = None, decode: Callable = None):
        """fn() as computed by the one worker that decides (here: this one)."""
        return fn()

    def journal(self, make: Callable):
        """The pass-2 journal, written by the lead only."""
        return make()

    def cache(self, cache):
        """The measurement cache, read and written by the lead only."""
        return cache

    def sensitivity(self, model: nn.Module, windows: torch.Tensor, resident, head) -> torch.Tensor:
        return layer_sensitivity(model, windows, resident, head, device=self.device)

    def pass2_resident(self, stream):
        """How pass 2 holds each layer: the lead keeps them (they are the output)."""
        return stream.kept if stream is not None else in_memory

    @contextmanager
    def stage(self, name: str):
        yield

    def shares(self) -> list[dict]:
        """What each worker did, for report.json."""
        return [{"rank": 0, "windows": self.windows_seen, "experts": "all", "seconds": round(time.time() - self.t0, 1),
                 "peak_rss_mb": round(peak_rss_mb(), 1)}]
