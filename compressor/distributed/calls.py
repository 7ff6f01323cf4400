"""A layer's calls on one rank of several (the distributed counterpart of calibration/calls.LiveCalls).

1. Record: the rank runs the layer forward once on its own calibration batches; every observer call an experts module
   would make (expert e, its routed inputs x, token ids, routing weights) becomes a message, as does each dense
   linear's input and each batch's token count and output sum of squares.
2. Assign: the routed rows of every expert and linear are summed over ranks (integers, exact) and each task gets an
   owner rank by LPT over the work it costs (distributed/assign.py): balanced by routed tokens and matrix size.
3. Route: one all-to-all delivers every message to its owner (batch logs to every rank), in rank order; since the
   ranks hold contiguous runs of batches, that is the global batch order.
4. Feed: the owner replays the calls into the pass's observers, recomputing each expert's down-projection input
   with the same code the forward used: the statistics are summed in the single-process order, bit for bit.
5. Complete: owners send the rows they computed and the modules they packed to every rank.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from ..calibration.calls import OnBatch, Owned
from ..calibration.layerwise import LayerInputs
from ..device import device_of
from .assign import matrix_cost, owners
from .wire import Message


class ShardedCalls:
    def __init__(self, driver, layer: nn.Module, inputs: LayerInputs | None, experts: dict[str, nn.Module],
                 linears: dict[str, nn.Module] | None = None):
        self.driver, self.comm = driver, driver.comm
        self.experts, self.linears = experts, linears or {}
        self.tasks = [(name, e) for name, m in experts.items() for e in range(m.num_experts)]
        self.tasks += [(name, None) for name in self.linears]
        self.channel = {task: k for k, task in enumerate(self.tasks)}
        self.log_channel = {name: len(self.tasks) + j for j, name in enumerate(experts)}
        self.what = next(iter([*experts, *self.linears]), "a layer")
        t0 = time.time()
        outbox: list[Message] = []
        self.outputs = self._record(layer, inputs, outbox) if inputs is not None else None
        t1 = time.time()
        rows = torch.zeros(len(self.tasks), dtype=torch.int64)
        for m in outbox:
            if m.channel < len(self.tasks):
                rows[m.channel] += m.tensors[0].shape[0]
        rows = self.comm.all_sum(rows, f"{self.what}: routed rows")
        self.owner = owners([self._cost(task, int(n)) for task, n in zip(self.tasks, rows)], self.comm.world)
        boxes: list[list[Message]] = [[] for _ in range(self.comm.world)]
        for m in outbox:
            for r in ([self.owner[m.channel]] if m.channel < len(self.tasks) else range(self.comm.world)):
                boxes[r].append(m)
        self.delivered: dict[int, list[Message]] = defaultdict(list)
        for m in self.comm.exchange(boxes, f"{self.what}: routed inputs to their owners"):
            self.delivered[m.channel].append(m)
        mine = [k for k, r in enumerate(self.owner) if r == self.comm.rank]
        driver.tally(experts=sum(self.tasks[k][1] is not None for k in mine), linears=sum(self.tasks[k][1] is None
                     for k in mine), tokens=int(sum(rows[k] for k in mine)), forward=t1 - t0, exchange=time.time() - t1)

    def _cost(self, task: tuple[str, int | None], rows: int) -> float:
        name, e = task
        if e is None:
            lin = self.linears[name]
            return matrix_cost(rows, lin.out_features, lin.in_features)
        gate_up, down = self.experts[name].expert_weights(e)
        return matrix_cost(rows, *gate_up.shape) + matrix_cost(rows, *down.shape)

    def _record(self, layer: nn.Module, inputs: LayerInputs, outbox: list[Message]) -> LayerInputs:
        """The layer forward on this rank's batches, every observer call, linear input and batch log a message."""
        batch = [self.driver.first_batch - 1]

        def next_batch(*_):
            batch[0] += 1

        def expert_call(name: str):
            return lambda e, x, h, tok, weights: outbox.append(
                Message(self.channel[name, e], batch[0], [x, tok, weights]))

        def batch_log(name: str):
            def hook(_m, args, out):
                tokens, sum_sq = args[0].shape[0], float(out.float().pow(2).sum())
                outbox.append(Message(self.log_channel[name], batch[0], [torch.tensor([tokens]),
                                                                         torch.tensor([sum_sq], dtype=torch.float64)]))
            return hook

        def linear_input(name: str):
            return lambda _m, args, _out: outbox.append(
                Message(self.channel[name, None], batch[0], [args[0].reshape(-1, args[0].shape[-1])]))

        handles = [layer.register_forward_pre_hook(next_batch)]
        handles += [m.register_forward_hook(batch_log(name)) for name, m in self.experts.items()]
        handles += [m.register_forward_hook(linear_input(name)) for name, m in self.linears.items()]
        for name, m in self.experts.items():
            m.observer = expert_call(name)
        try:
            return inputs.run(layer)
        finally:
            for h in handles:
                h.remove()
            for m in self.experts.values():
                m.observer = None

    # --- the interface of calibration.calls.LiveCalls ----------------------------------------------------------

    def owned(self, block: str) -> Owned:
        E = self.experts[block].num_experts
        return Owned(tuple(e for e in range(E) if self.owner[self.channel[block, e]] == self.comm.rank), E)

    def owns(self, linear: str) -> bool:
        return self.owner[self.channel[linear, None]] == self.comm.rank

    def feed(self, observers: dict[str, Callable] | None = None, batches: dict[str, OnBatch] | None = None,
             linears: dict[str, Callable] | None = None) -> LayerInputs | None:
        """Replays the owned experts' calls into `observers` and the owned linears' inputs into `linears`, each in
        batch order; every rank's batch logs into `batches`. Returns this rank's outputs of the layer."""
        for name, observer in (observers or {}).items():
            module = self.experts[name]
            device = device_of(module)
            for e in self.owned(name).experts:
                for m in self.delivered[self.channel[name, e]]:
                    x, tok, weights = (t.to(device) for t in m.tensors)
                    observer(e, x, module.hidden(e, x), tok, weights)
        for name, on_batch in (batches or {}).items():
            for m in self.delivered[self.log_channel[name]]:
                on_batch(int(m.tensors[0]), float(m.tensors[1]))
        for name, hook in (linears or {}).items():
            module = self.linears[name]
            for m in self.delivered[self.channel[name, None]]:
                hook(module, (m.tensors[0].to(device_of(module)),), None)
        return self.outputs

    def complete_rows(self, block: str, rows: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        present = [r for r in rows if r is not None]
        mine = [Message(self.channel[block, e], -1, [r[e] for r in present]) for e in self.owned(block).experts]
        for m in self.comm.to_all(mine, f"{block}: per-expert results"):
            e = self.tasks[m.channel][1]
            for r, t in zip(present, m.tensors):
                r[e] = t.to(r.device)
        return rows

    def share_experts(self, block: str, made: dict[int, tuple[nn.Module, nn.Module]],
                      empty: Callable[[int], tuple[nn.Module, nn.Module]]) -> list[tuple[nn.Module, nn.Module]]:
        mine = [Message(self.channel[block, e], -1, _tensors(gu) + _tensors(d)) for e, (gu, d) in made.items()]
        got = {self.tasks[m.channel][1]: m.tensors for m in self.comm.to_all(mine, f"{block}: packed experts")}
        pairs = []
        for e in range(self.experts[block].num_experts):
            if e not in made:
                gu, d = empty(e)
                k = len(gu.state_dict())
                _load(gu, got[e][:k])
                _load(d, got[e][k:])
                made[e] = (gu, d)
            pairs.append(made[e])
        return pairs

    def share_linears(self, made: dict[str, nn.Module], empty: Callable[[str], nn.Module]) -> dict[str, nn.Module]:
        mine = [Message(self.channel[name, None], -1, _tensors(m)) for name, m in made.items()]
        out = dict(made)
        for m in self.comm.to_all(mine, f"{self.what}: packed linears"):
            name = self.tasks[m.channel][0]
            if name not in out:
                out[name] = empty(name)
                _load(out[name], m.tensors)
        return out

    def gather_notes(self, notes: list[str]) -> list[str]:
        return [n for ns in self.comm.gather_json(notes, f"{self.what}: report notes") for n in ns]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's state in a canonical order (sorted names), as sent."""
    state = module.state_dict()
    return [state[k] for k in sorted(state)]


def _load(module: nn.Module, tensors: list[torch.Tensor]) -> None:
    """Inverse of _tensors: the sent tensors become the module's (their dtypes as the owner made them), on the
    module's device."""
    device = device_of(module)
    module.load_state_dict(dict(zip(sorted(module.state_dict()), tensors)), assign=True)
    module.to(device)
