"""Work splitting and per-task random streams."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from isavar.parallel import SerialExecutor, make_executor, map_in_windows
from isavar.parallel.partition import balanced_ranges, chunk_ranges, task_rngs, weighted_ranges


@given(st.integers(0, 1000), st.integers(1, 64))
def test_balanced_ranges_cover_exactly(n, parts):
    ranges = balanced_ranges(n, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert all(r1[1] == r2[0] for r1, r2 in zip(ranges, ranges[1:]))


@given(st.lists(st.floats(0, 1e6), max_size=300), st.integers(1, 64))
def test_weighted_ranges_cover_exactly_with_near_equal_costs(costs, parts):
    ranges = weighted_ranges(costs, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(a <= b for a, b in ranges) and all(r1[1] == r2[0] for r1, r2 in zip(ranges, ranges[1:]))
    c = np.asarray(costs, np.float64)
    if c.sum() > 0:
        # no block holds more than its share plus one task
        assert max(c[a:b].sum() for a, b in ranges) <= c.sum() / parts + c.max() * (1 + 1e-9) + 1e-6


def test_weighted_ranges_balance_uneven_tasks():
    costs = [40] + [1] * 40 + [40]
    ranges = weighted_ranges(costs, 2)
    assert [sum(costs[a:b]) for a, b in ranges] == [60, 60]
    assert weighted_ranges([1.0] * 10, 3) == [(0, 3), (3, 7), (7, 10)]     # equal costs: equal counts
    assert weighted_ranges([0.0, 0.0], 2) == balanced_ranges(2, 2)


@given(st.integers(0, 1000), st.integers(1, 64))
def test_chunk_ranges_cover_exactly(n, size):
    ranges = chunk_ranges(n, size)
    assert sum(b - a for a, b in ranges) == n
    assert all(0 < b - a <= size for a, b in ranges)


def test_task_rngs_reproducible_and_independent():
    a = [g.random(4) for g in task_rngs(7, 3)]
    b = [g.random(4) for g in task_rngs(7, 3)]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])
    c = [g.random(4) for g in task_rngs(7, 3, key=1)]
    assert not np.allclose(a[0], c[0])
    # The stream of task i does not depend on how many tasks were spawned.
    np.testing.assert_array_equal(task_rngs(7, 5)[2].random(4), a[2])


def _square(x):
    return x * x


def test_pool_executor_matches_serial():
    tasks = list(range(10))
    pool = make_executor("pool", workers=2)
    try:
        assert pool.map(_square, tasks) == SerialExecutor().map(_square, tasks)
        # a generator longer than the submission window (2 * workers + 2) is consumed lazily, in order
        seen = []

        def lazy():
            for i in range(25):
                seen.append(i)
                yield i
        assert pool.map(_square, lazy()) == [i * i for i in range(25)]
        assert seen == list(range(25))
    finally:
        pool.close()


@given(st.integers(0, 30), st.integers(1, 7))
def test_map_in_windows_keeps_task_order(n, window):
    expected = [i * i for i in range(n)]
    assert list(map_in_windows(SerialExecutor(), _square, iter(range(n)), window)) == expected
    assert list(map_in_windows(None, _square, iter(range(n)), window)) == expected
