"""Tokens grouped by expert: which rows of the hidden states each expert computes, from the router's top-k slots.

`group_by_expert(top_k_index [T, k], E)` yields (expert, token rows [n], slots [n]) for every expert with at least
one routed token, in expert order; a slot is a flat index t * k + j into top_k_index, and slots outside [0, E) (-1 for
a slot dynamic pruning skipped, E for a masked one) belong to no expert. Within an expert the slots are ascending, so
the accumulation order is the per-token loop's (tested against it). Decode-sized calls group on the host (a list);
larger ones sort once and cut the sorted slots at the experts' counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

HOST_SLOTS = 64  # up to this many slots (decode, small batches) grouping in Python beats a sort


def group_by_expert(top_k_index: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    device = flat.device
    if flat.numel() <= HOST_SLOTS:
        groups: dict[int, list[int]] = {}
        for slot, e in enumerate(flat.tolist()):
            if 0 <= e < num_experts:
                groups.setdefault(e, []).append(slot)
        for e in sorted(groups):
            slots = torch.tensor(groups[e], dtype=torch.long, device=device)
            yield e, slots // k, slots
        return
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1).tolist()
    start = 0
    for e, n in enumerate(counts[:num_experts]):
        if n:
            slots = order[start:start + n]
            yield e, slots // k, slots
        start += n
