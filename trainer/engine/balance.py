"""Length-balanced mini-batches (psft.balanceBatch), as the seed's `balance_batch`.

The seed (verl 0.5, `trainer.balance_batch: true`) reorders every global batch so that its
data-parallel ranks get equal-size partitions of about the same total tokens, found with the
Karmarkar-Karp largest-differencing method. One process has one rank, so here the partitions
are the step's mini-batches: each optimizer update sees about the same number of tokens
instead of whatever a contiguous chunk of the shuffled batch holds. Only the order within
the step changes; the step's rows are the same (docs/seed-fidelity.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def balanced_partitions(sizes: Sequence[int], k: int) -> list[list[int]]:
    """Indices of `sizes` in k partitions of len(sizes)/k items each, with near-equal sums.

    Karmarkar-Karp for equal-size k-way partitioning: items are taken k at a time in
    descending size, each such group is a state of k one-item partitions, and the two states
    with the largest spread (largest minus smallest sum) are merged repeatedly, the largest
    partition of one joining the smallest of the other. Each partition's indices are sorted.
    """
    n = len(sizes)
    if k <= 0 or n % k:
        raise ValueError(f"{n} items do not split into {k} equal partitions")
    order = sorted(range(n), key=lambda i: (sizes[i], i), reverse=True)
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for tie, start in enumerate(range(0, n, k)):
        state = sorted(((sizes[i], [i]) for i in order[start : start + k]), reverse=True)
        heapq.heappush(heap, (-(state[0][0] - state[-1][0]), tie, state))
    tie = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # a is sorted descending, b ascending: big meets small
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b), strict=True)]
        merged.sort(key=lambda part: (part[0], part[1]), reverse=True)
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return sorted(sorted(indices) for _, indices in heap[0][2])


def balanced_order(lengths: Sequence[int], k: int) -> list[int]:
    """A permutation of range(len(lengths)) whose k contiguous chunks are balanced
    partitions (in order of their first index)."""
    return [i for part in balanced_partitions(lengths, k) for i in part]


def spread(lengths: Sequence[int], k: int, order: Sequence[int] | None = None) -> int:
    """Largest minus smallest chunk sum when `order` is cut into k contiguous chunks."""
    order = list(range(len(lengths))) if order is None else list(order)
    size = len(order) // k
    sums = [sum(lengths[i] for i in order[c * size : (c + 1) * size]) for c in range(k)]
    return max(sums) - min(sums)
