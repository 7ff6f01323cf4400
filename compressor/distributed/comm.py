"""The process group (torch.distributed: gloo on CPU, NCCL on GPU) and the few collectives the driver uses, each
guarded: when one fails, this rank finds out which rank is to blame and raises RankFailure naming it.

How a failure is named. Every rank beats a heartbeat counter in the rendezvous store from a thread of its own (a
separate store client), records the step it is entering before each collective, and posts its error message there
when it fails with an exception. A rank that dies (SIGKILL, OOM killer, a lost machine) closes its sockets, so the
others' collective fails at once; the others then read the store: a posted error names the rank and its message, a
heartbeat that stopped names a rank that died, and a step counter behind their own names a rank that never arrived
(a hang, seen after `timeout` seconds). Nothing waits forever: the process group, the store and every wait here
have the timeout.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from ..device import HOST
from ..errors import UserError
from .wire import Message, pack, unpack

BEAT = 1.0  # seconds between heartbeats; a rank is dead after 3 missed ones


class RankFailure(UserError, RuntimeError):
    """Another rank failed or stopped answering; this one stops too (the message names the rank)."""


def launched() -> bool:
    """Whether this process is one rank of several (torchrun, or any env:// launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Comm:
    def __init__(self, device: torch.device, timeout: float):
        """Joins the process group described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as
        torchrun sets them). Collectives run on `device` with NCCL when it is a GPU, on the host with gloo otherwise."""
        self.timeout = timeout
        store, self.rank, self.world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=timeout))
        self.device = device if backend == "nccl" else HOST
        self.store = dist.PrefixStore("moe-compressor/", store)
        self.step, self.sent = 0, 0  # collectives entered; bytes sent to other ranks
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat, daemon=True, name="moe-compressor heartbeat")
        self._beats.start()

    # --- failure handling --------------------------------------------------------------------------------------

    def _beat(self) -> None:
        try:
            client = dist.PrefixStore("moe-compressor/", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                timeout=timedelta(seconds=self.timeout)))
            while not self._stop.is_set():
                client.add(f"beat/{self.rank}", 1)
                self._stop.wait(BEAT)
        except Exception:  # the store is gone: the collectives will say so
            pass

    def post_failure(self, err: BaseException) -> None:
        """Tells the other ranks why this one stops (they name it with this message)."""
        try:
            self.store.set(f"failed/{self.rank}", f"{type(err).__name__}: {err}"[:2000])
        except Exception:
            pass

    def diagnose(self, what: str, err: BaseException) -> RankFailure:
        return diagnose(self.store, self.rank, self.world, self.step, self.timeout, what, err)

    @contextmanager
    def guard(self, what: str):
        """Enter one collective step: recorded in the store, and a failure inside becomes a RankFailure naming the
        rank at fault."""
        self.step += 1
        try:
            self.store.set(f"at/{self.rank}", f"{self.step} {what}")
            yield
        except RankFailure:
            raise
        except Exception as err:  # gloo and NCCL raise RuntimeError (DistBackendError) for a lost or late peer
            raise self.diagnose(what, err) from err

    def close(self) -> None:
        self._stop.set()
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- collectives -------------------------------------------------------------------------------------------

    def exchange(self, outboxes: list[list[Message]], what: str) -> list[Message]:
        """All-to-all: outboxes[d] goes to rank d; returns what every rank sent here, by source rank, in order."""
        packed = [pack(box, self.device) for box in outboxes]
        self.sent += sum(8 * h.numel() + d.numel() for r, (h, d) in enumerate(packed) if r != self.rank)
        with self.guard(what):
            sizes = torch.tensor([[h.numel(), d.numel()] for h, d in packed], dtype=torch.int64).to(self.device)
            got = torch.empty_like(sizes)
            dist.all_to_all_single(got.view(-1), sizes.view(-1))
            got = got.tolist()
            header = torch.empty(sum(h for h, _ in got), dtype=torch.int64, device=self.device)
            dist.all_to_all_single(header, torch.cat([h for h, _ in packed]), [h for h, _ in got],
                                   [h.numel() for h, _ in packed])
            data = torch.empty(sum(d for _, d in got), dtype=torch.uint8, device=self.device)
            dist.all_to_all_single(data, torch.cat([d for _, d in packed]), [d for _, d in got],
                                   [d.numel() for _, d in packed])
        out, h0, d0 = [], 0, 0
        for h, d in got:
            out += unpack(header[h0:h0 + h], data[d0:d0 + d])
            h0, d0 = h0 + h, d0 + d
        return out

    def to_all(self, messages: list[Message], what: str) -> list[Message]:
        """Every rank's messages to every rank (in rank order)."""
        return self.exchange([messages] * self.world, what)

    def all_sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """An integer tensor summed over ranks (exact)."""
        out = t.to(self.device).clone()
        with self.guard(what):
            dist.all_reduce(out)
        return out.to(t.device)

    def broadcast_json(self, value, what: str, src: int = 0):
        """`value` (JSON-able) of rank `src` on every rank."""
        data = _utf8(json.dumps(value) if self.rank == src else "")
        (msg,) = self.exchange([[Message(0, -1, [data])] if self.rank == src else []] * self.world, what)
        return json.loads(_text(msg.tensors[0]))

    def gather_json(self, value, what: str) -> list:
        """Every rank's `value` (JSON-able), in rank order, on every rank."""
        data = _utf8(json.dumps(value))
        return [json.loads(_text(m.tensors[0])) for m in self.to_all([Message(0, -1, [data])], what)]

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, what: str, src: int = 0
                          ) -> dict[str, torch.Tensor] | None:
        """Rank `src`'s named tensors (or None) on every rank (on the host)."""
        names = self.broadcast_json(None if tensors is None else list(tensors), what, src)
        if names is None:
            return None
        mine = [Message(0, -1, [tensors[n] for n in names])] if self.rank == src else []
        (msg,) = self.exchange([mine] * self.world, what)
        return {n: t.to(HOST) for n, t in zip(names, msg.tensors)}


def diagnose(store, rank: int, world: int, step: int, timeout: float, what: str, err: BaseException,
             beat: float = BEAT) -> RankFailure:
    """Which rank made collective step `step` (`what`) fail on `rank`, read from the store: a posted error, a heartbeat
    that stopped (3 beats), or a step counter behind this rank's."""
    head = f"rank {rank} of {world} stops during {what}"
    others = [r for r in range(world) if r != rank]

    def posted() -> dict[int, str]:
        return {r: store.get(f"failed/{r}").decode() for r in others if store.check([f"failed/{r}"])}

    try:
        failed, dead = posted(), []
        if not failed:
            beats = lambda: {r: int(store.add(f"beat/{r}", 0)) for r in others}
            before = beats()
            time.sleep(3 * beat)
            after, failed = beats(), posted()
            dead = [r for r in others if after[r] == before[r]]
        if failed:
            return RankFailure(f"{head}: " + "; ".join(f"rank {r} failed: {m}" for r, m in sorted(failed.items())))
        if dead:
            return RankFailure(f"{head}: rank {', '.join(map(str, dead))} stopped responding (no heartbeat for "
                               f"{3 * beat:.0f} s: killed, out of memory, or its machine is down). Rerun the same "
                               "command: finished layers resume from the journals")
        steps = {r: store.get(f"at/{r}").decode() for r in others if store.check([f"at/{r}"])}
        late = {r: at for r, at in steps.items() if int(at.split(" ", 1)[0]) < step}
        if late:
            return RankFailure(f"{head}: " + "; ".join(f"rank {r} did not arrive within {timeout:.0f} s (it is at step "
                                                       f"{at})" for r, at in sorted(late.items()))
                               + f"; raise --dist-timeout if it is merely slow ({err})")
        return RankFailure(f"{head}: the collective failed with every rank alive and at the same step: {err}")
    except Exception as store_err:  # the store lives in rank 0's process (or torchrun's agent)
        return RankFailure(f"{head}: the rendezvous store is unreachable ({store_err}), so rank 0 or the launcher is "
                           f"gone; the collective failed with: {err}")


def _text(t: torch.Tensor) -> str:
    return t.to(HOST).numpy().tobytes().decode()


def _utf8(text: str) -> torch.Tensor:
    raw = bytearray(text.encode())
    return torch.frombuffer(raw, dtype=torch.uint8).clone() if raw else torch.zeros(0, dtype=torch.uint8)
