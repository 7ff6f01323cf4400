"""The driver of one rank of a torchrun launch (the distributed counterpart of pipeline/driver.LocalDriver).

Calibration batches (of 8 windows, pass 1 and pass 2) and sensitivity windows are split over ranks in contiguous runs;
each rank streams every layer from disk while the layer is at hand and forwards its own batches through it; the
experts and linears of each layer are owned by ranks (distributed/calls.py); rank 0 solves the LP (broadcast as
JSON), holds the journals and the measurement cache (distributed/lead.py) and writes the output. Every other rank
releases each layer once it is done, so only rank 0 ever holds the compressed model.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ..calibration.layerwise import LayerInputs, in_memory
from ..calibration.sensitivity import combine_terms, sensitivity_terms
from ..device import resolve
from ..errors import UserError
from ..io.report import peak_rss_mb
from .assign import batch_range
from .calls import ShardedCalls
from .comm import Comm, RankFailure
from .lead import SharedCache, SharedJournal
from .wire import Message

BATCH = 8  # windows per calibration batch: layerwise's default, the unit the batches are split over ranks in


class NotDistributed(UserError, ValueError):
    """A setting the distributed driver does not run (yet); the message says what to do instead."""


class RankDriver:
    def __init__(self, recipe, comm: Comm | None = None):
        if recipe.calibration.mode == "weighted":
            raise NotDistributed("--calib-mode weighted is not distributed (every expert's Hessian would need every "
                                 "token's hidden state on its owner rank): run it in one process, or use routed")
        self.device = resolve(recipe.execution.device)
        self.comm = comm or Comm(self.device, recipe.execution.timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.world
        self.is_lead = self.rank == 0
        self.first_batch, self.windows_held = 0, 0
        self.current = "setup"
        self.account: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        if not self.is_lead:
            os.environ["TQDM_DISABLE"] = "1"  # one set of progress bars, rank 0's

    def check(self, image_path: bool) -> None:
        if image_path:
            raise NotDistributed("this model's MoE blocks are up-cycled MLPs on its image path, worked on block by "
                                 "block in one process: run it without torchrun")

    # --- the interface of pipeline.driver.LocalDriver ----------------------------------------------------------

    def calls(self, layer: nn.Module | None, inputs: LayerInputs | None, experts: dict[str, nn.Module],
              linears: dict[str, nn.Module] | None = None) -> ShardedCalls:
        return ShardedCalls(self, layer, inputs, experts, linears)

    def windows(self, windows: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's contiguous run of whole calibration batches."""
        if windows is None:
            return None
        batches = batch_range(math.ceil(windows.shape[0] / BATCH), self.rank, self.world_size)
        self.first_batch = batches.start
        mine = windows[batches.start * BATCH:batches.stop * BATCH]
        self.windows_held = mine.shape[0]
        return mine

    def lead(self, fn: Callable, encode: Callable = lambda v: v, decode: Callable = lambda v: v):
        """fn() computed on rank 0, sent to every rank as JSON (encode/decode: to and from JSON-able values)."""
        value = encode(fn()) if self.is_lead else None
        return decode(self.comm.broadcast_json(value, f"{self.current}: rank 0's result"))

    def journal(self, make: Callable) -> SharedJournal:
        return SharedJournal(make() if self.is_lead else None, self.comm)

    def cache(self, cache) -> SharedCache:
        return SharedCache(cache, self.comm)

    def sensitivity(self, model: nn.Module, windows: torch.Tensor, resident, head) -> torch.Tensor:
        """Each rank's terms over its windows, concatenated in window order, summed as one process sums them."""
        mine = batch_range(windows.shape[0], self.rank, self.world_size)
        with self.stage("sensitivity"):
            terms = sensitivity_terms(model, windows[mine.start:mine.stop], resident, head, device=self.device)
            every = self.comm.to_all([Message(0, -1, [terms])], "layer sensitivity terms")
        return combine_terms(torch.cat([m.tensors[0] for m in every]), windows.numel())

    def pass2_resident(self, stream):
        """Rank 0 keeps each quantized layer (it writes the output); the others release it once done."""
        if stream is None:
            return in_memory
        return stream.kept if self.is_lead else stream.resident

    @contextmanager
    def stage(self, name: str):
        previous, self.current, t0, sent = self.current, name, time.time(), self.comm.sent
        try:
            yield
        finally:
            self.account[name]["seconds"] += time.time() - t0
            self.account[name]["sent_bytes"] += self.comm.sent - sent
            self.current = previous

    def tally(self, **amounts: float) -> None:
        for k, v in amounts.items():
            self.account[self.current][k] += v

    def shares(self) -> list[dict]:
        """Every rank's share (on every rank): windows, and per stage experts and linears owned, routed tokens
        received, bytes sent to other ranks, seconds (forward, exchange, total)."""
        mine = {"rank": self.rank, "windows": self.windows_held, "peak_rss_mb": round(peak_rss_mb(), 1),
                "stages": {s: {k: round(v, 2) if isinstance(v, float) else v for k, v in a.items()}
                           for s, a in self.account.items()}}
        return self.comm.gather_json(mine, "report: every rank's share")

    def close(self, err: BaseException | None = None) -> None:
        if err is not None and not isinstance(err, RankFailure):
            self.comm.post_failure(err)
        self.comm.close()
