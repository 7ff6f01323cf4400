"""Who owns what (compressor/distributed/assign.py): every expert owned exactly once, loads balanced, against brute
force; calibration batches split into contiguous runs that are, rank after rank, all batches in order."""

from __future__ import annotations

import itertools
import random

import pytest

from compressor.distributed.assign import batch_range, matrix_cost, owners


def loads(costs, owner, ranks):
    out = [0.0] * ranks
    for c, r in zip(costs, owner):
        out[r] += c
    return out


@pytest.mark.parametrize("seed", range(20))
def test_every_task_owned_once_and_loads_balanced(seed):
    rng = random.Random(seed)
    ranks = rng.randint(1, 4)
    costs = [rng.choice([1.0, rng.uniform(0.1, 10), rng.uniform(50, 200)]) for _ in range(rng.randint(1, 9))]
    owner = owners(costs, ranks)
    assert len(owner) == len(costs) and all(0 <= r < ranks for r in owner), "complete: one owner per task"
    load = loads(costs, owner, ranks)
    assert max(load) - min(load) <= max(costs) + 1e-9, "no rank waits on another by more than one task"
    best = min(max(loads(costs, o, ranks)) for o in itertools.product(range(ranks), repeat=len(costs)))
    assert max(load) <= 4 / 3 * best + 1e-9, "LPT's bound against the brute-force optimum"


def test_equal_experts_split_evenly_and_busy_ones_spread():
    assert sorted(loads([1.0] * 8, owners([1.0] * 8, 2), 2)) == [4.0, 4.0]
    busy = [matrix_cost(rows, 3072, 576) + matrix_cost(rows, 576, 1536) for rows in (4000, 4000, 300, 300, 200, 200, 100, 100)]
    owner = owners(busy, 2)
    assert owner[0] != owner[1], "the two busiest experts on different ranks"


def test_the_same_numbers_give_every_rank_the_same_answer():
    costs = [3.0, 1.0, 3.0, 2.0, 2.0, 1.0]
    assert owners(costs, 3) == owners(list(costs), 3) == [0, 0, 1, 2, 2, 1]  # LPT worked by hand: loads 4, 4, 4


@pytest.mark.parametrize("batches,ranks", [(2, 2), (3, 2), (1, 2), (16, 3), (0, 2), (5, 8)])
def test_batches_split_in_contiguous_runs_in_order(batches, ranks):
    runs = [batch_range(batches, r, ranks) for r in range(ranks)]
    assert [b for run in runs for b in run] == list(range(batches))
    assert max(map(len, runs)) - min(map(len, runs)) <= 1
