"""What rank 0 holds for everyone: the pass-2 journal, the pass-1 measurement journal and cache. Rank 0 reads and
writes them; every decision they make (a layer already journaled, measurements already cached) is broadcast, with
the tensors when the other ranks need them, so all ranks take the same path. The journals' files and digests are
those of a single-process run (its output is the same): either kind of run resumes the other's."""

from __future__ import annotations

from ..io.measure_cache import MeasureJournal, MeasurementCache, _pack, _unpack
from .comm import Comm


class SharedJournal:
    """Pass 2's journal (io/journal.Journal) of rank 0, as QuantizePass uses it on every rank."""

    def __init__(self, journal, comm: Comm):
        self.journal, self.comm = journal, comm
        self.dir = journal.dir if journal is not None else "rank 0's journal"

    def load(self, i: int):
        hit = self.journal.load(i) if self.journal is not None else None
        tensors = self.comm.broadcast_tensors(hit[0] if hit else None, f"journal: layer {i}")
        if tensors is None:
            return None
        return tensors, self.comm.broadcast_json(hit[1] if hit else None, f"journal: layer {i} report")

    def save(self, i: int, tensors, report: dict) -> None:
        if self.journal is not None:
            self.journal.save(i, tensors, report)

    def remove(self) -> None:
        if self.journal is not None:
            self.journal.remove()


class SharedMeasureJournal:
    """Pass 1's journal (io/measure_cache.MeasureJournal) of rank 0, as MeasurePass uses it on every rank."""

    def __init__(self, journal: MeasureJournal | None, comm: Comm):
        self.journal, self.comm = journal, comm
        self.dir = journal.dir if journal is not None else None

    def load(self, i: int):
        got = self.journal.load(i) if self.journal is not None else None
        packed = _pack(got) if got is not None else None
        tensors = self.comm.broadcast_tensors(packed[0] if packed else None, f"measurement journal: layer {i}")
        if tensors is None:
            return None
        return _unpack(tensors, self.comm.broadcast_json(packed[1] if packed else None, f"measurement journal: {i}"))

    def save(self, i: int, measurements) -> None:
        if self.journal is not None:
            self.journal.save(i, measurements)

    def remove(self) -> None:
        if self.journal is not None:
            self.journal.remove()


class SharedCache:
    """The measurement cache (io/measure_cache.MeasurementCache) of rank 0, as make_plan uses it on every rank.
    A cached result is needed on rank 0 only (it solves the LP): the others get None for it."""

    def __init__(self, cache: MeasurementCache, comm: Comm):
        self.cache, self.comm = cache, comm

    @property
    def outcome(self) -> str:
        return self.cache.outcome

    def get_or_measure(self, model_dir, recipe, windows, measure, log=print):
        lead = self.comm.rank == 0
        entry = self.cache.entry(model_dir, recipe, windows, log) if lead else None
        if self.comm.broadcast_json(lead and entry.hit is not None, "measurement cache"):
            return entry.hit if lead else (None, None)
        use_journal = self.cache.directory is not None  # the recipe's, the same on every rank
        journal = SharedMeasureJournal(entry.journal(log) if lead else None, self.comm) if use_journal else None
        if lead:
            return entry.measure(measure, journal, log)
        return measure(journal)

    def get_or_compute_sensitivity(self, model_dir, windows, compute, log=print):
        lead = self.comm.rank == 0
        path, key, inputs, hit = self.cache.sensitivity_entry(model_dir, windows, log) if lead else (None,) * 4
        if self.comm.broadcast_json(hit is not None, "sensitivity cache"):
            return hit
        s = compute()
        if lead:
            self.cache.keep_sensitivity(path, key, inputs, s, log)
        return s

