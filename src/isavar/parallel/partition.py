"""Splitting work into balanced ranges and spawning per-task random streams."""

from __future__ import annotations

import numpy as np


def balanced_ranges(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Split ``range(n_items)`` into ``n_parts`` contiguous blocks of near-equal size.

    Parameters
    ----------
    n_items : int
        Number of items.
    n_parts : int
        Number of blocks (>= 1).

    Returns
    -------
    list of (start, stop)
        Half-open ranges; the first ``n_items % n_parts`` blocks hold one more item.

    Examples
    --------
    >>> balanced_ranges(5, 2)
    [(0, 3), (3, 5)]
    """
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    base, extra = divmod(n_items, n_parts)
    ranges, start = [], 0
    for i in range(n_parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def weighted_ranges(costs, n_parts: int) -> list[tuple[int, int]]:
    """Split ``range(len(costs))`` into ``n_parts`` contiguous blocks of near-equal total cost.

    Block ``p`` ends where the running total of the costs first reaches ``(p + 1) / n_parts`` of the whole,
    so no block's total exceeds ``total / n_parts`` by more than one item's cost. With equal costs this is
    :func:`balanced_ranges` up to where the remainders go.

    Parameters
    ----------
    costs : sequence of float
        Non-negative relative cost of each item (e.g. images x references of a task).
    n_parts : int
        Number of blocks (>= 1).

    Returns
    -------
    list of (start, stop)
        Half-open ranges in order, covering every item; a block may be empty.

    Examples
    --------
    >>> weighted_ranges([5, 1, 1, 1, 1, 1], 2)
    [(0, 1), (1, 6)]
    """
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    if np.any(costs < 0) or not np.all(np.isfinite(costs)):
        raise ValueError("costs must be finite and >= 0")
    total = float(costs.sum())
    if costs.size == 0 or total <= 0:
        return balanced_ranges(costs.size, n_parts)
    ends = np.cumsum(costs)
    # the item at which each block's share is reached belongs to the block if more of it lies before the
    # share than after it (rounding of the prefix sums cannot move a boundary past an item of cost > 0)
    bounds = [0]
    for p in range(1, n_parts):
        share = total * p / n_parts
        i = int(np.searchsorted(ends, share))                 # first item whose end reaches the share
        if i < costs.size and ends[i] - share < share - (ends[i] - costs[i]):
            i += 1
        bounds.append(min(max(i, bounds[-1]), costs.size))
    bounds.append(costs.size)
    return [(bounds[p], bounds[p + 1]) for p in range(n_parts)]


def chunk_ranges(n_items: int, chunk_size: int) -> list[tuple[int, int]]:
    """Split ``range(n_items)`` into consecutive chunks of at most ``chunk_size`` items.

    Parameters
    ----------
    n_items : int
        Number of items.
    chunk_size : int
        Largest chunk (>= 1).

    Returns
    -------
    list of (start, stop)

    Examples
    --------
    >>> chunk_ranges(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return [(s, min(s + chunk_size, n_items)) for s in range(0, n_items, chunk_size)]


def task_rngs(seed: int | None, n_tasks: int, *, key: int = 0) -> list[np.random.Generator]:
    """Independent random generators, one per task, from one seed.

    Streams are indexed by task (and ``key``, e.g. an iteration number), never
    by process, so the same seed gives the same numbers on any executor.

    Parameters
    ----------
    seed : int or None
        User seed.
    n_tasks : int
        Number of generators.
    key : int
        Extra entropy distinguishing independent uses of the same seed.

    Returns
    -------
    list of numpy.random.Generator
    """
    root = np.random.SeedSequence(entropy=seed, spawn_key=(key,))
    return [np.random.default_rng(s) for s in root.spawn(n_tasks)]
