"""The pieces of compressor/distributed that need no process group: tensors on the wire and back, and how a failed
collective names the rank at fault from what the store holds."""

from __future__ import annotations

import torch

from compressor.distributed.comm import RankFailure, diagnose
from compressor.distributed.wire import Message, pack, unpack


def test_messages_survive_the_wire_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    sent = [Message(3, 1, [torch.randn(5, 7, generator=g), torch.arange(4), torch.tensor([True, False])]),
            Message(0, -1, []),
            Message(9, 2, [torch.randn(0, 5).half(), torch.tensor(2.5, dtype=torch.float64),
                           torch.randn(3, generator=g).bfloat16(), torch.randint(0, 255, (6,), dtype=torch.uint8)])]
    got = unpack(*pack(sent, torch.device("cpu")))
    assert [(m.channel, m.batch, len(m.tensors)) for m in got] == [(m.channel, m.batch, len(m.tensors)) for m in sent]
    for a, b in zip(sent, got):
        for x, y in zip(a.tensors, b.tensors):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
            assert x.numel() == 0 or x.data_ptr() != y.data_ptr(), "a fresh tensor, not a view of the buffer"


class Store:
    """What diagnose reads of torch.distributed's store: set/get/check/add; `beating` ranks' heartbeats advance."""

    def __init__(self, values: dict[str, str] | None = None, beating: tuple[int, ...] = (), broken: bool = False):
        self.values, self.beating, self.broken, self.reads = dict(values or {}), beating, broken, {}

    def check(self, keys):
        if self.broken:
            raise RuntimeError("Connection refused")
        return all(k in self.values for k in keys)

    def get(self, key):
        return self.values[key].encode()

    def add(self, key, n):
        rank = int(key.split("/")[1])
        self.reads[rank] = self.reads.get(rank, 0) + (rank in self.beating)
        return 10 + self.reads[rank]


def name(store, step=5, world=3) -> str:
    return str(diagnose(store, 0, world, step, 60, "layer 1: routed inputs", RuntimeError("Connection closed"), 0.01))


def test_a_rank_that_posted_its_error_is_named_with_it():
    msg = name(Store({"failed/2": "NonFiniteError: NaN in layer 1 expert 3"}, beating=(1,)))
    assert msg.startswith("rank 0 of 3 stops during layer 1: routed inputs: rank 2 failed: NonFiniteError: NaN")


def test_a_rank_whose_heartbeat_stopped_is_named_dead():
    msg = name(Store(beating=(2,)))
    assert "rank 1 stopped responding" in msg and "rank 2" not in msg


def test_a_rank_behind_is_named_after_the_timeout():
    msg = name(Store({"at/1": "5 layer 1: routed inputs", "at/2": "3 measurement cache"}, beating=(1, 2)))
    assert "rank 2 did not arrive within 60 s (it is at step 3 measurement cache)" in msg and "rank 1" not in msg


def test_a_lost_store_says_rank_0_or_the_launcher_is_gone():
    msg = name(Store(broken=True), world=2)
    assert "rendezvous store is unreachable" in msg and "rank 0 or the launcher is gone" in msg
    assert isinstance(diagnose(Store(broken=True), 1, 2, 1, 60, "x", RuntimeError()), RankFailure)
