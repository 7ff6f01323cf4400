"""Who does what: the experts and linears of a layer given owner ranks, and calibration batches given to ranks.
Pure functions (no torch.distributed): every rank computes the same answer from the same numbers."""

from __future__ import annotations

from typing import Sequence


def owners(costs: Sequence[float], ranks: int) -> list[int]:
    """An owner rank for each task: largest first (ties: lower index), each to the least loaded rank so far (ties:
    lower rank), i.e. LPT scheduling. Every task is owned once; the loads differ by at most the largest cost, and the
    largest load is within 4/3 of the best possible."""
    if ranks < 1:
        raise ValueError(f"need at least one rank, got {ranks}")
    load, owner = [0.0] * ranks, [0] * len(costs)
    for task in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(ranks), key=lambda j: (load[j], j))
        owner[task] = r
        load[r] += costs[task]
    return owner


def matrix_cost(rows: int, out_features: int, in_features: int) -> float:
    """Work a worker does for one matrix it owns, in multiply-adds: per routed row the forward and the Hessian
    update (out x in + in x in), then GPTQ's sweep (out x in x in). A proxy that ranks tasks, not a time."""
    return float(rows) * (out_features * in_features + in_features * in_features) + \
        float(out_features) * in_features * in_features


def batch_range(num_batches: int, rank: int, ranks: int) -> range:
    """Rank `rank`'s calibration batches: contiguous, in order, the counts differing by at most one, so that the
    batches of rank 0, 1, ... in turn are all batches in order."""
    return range(rank * num_batches // ranks, (rank + 1) * num_batches // ranks)
