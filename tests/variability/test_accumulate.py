"""The one accumulation loop: fixed rounds of exact reductions, bit-identical for any executor and on resume."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.parallel.pool import PoolExecutor
from isavar.parallel.serial import SerialExecutor
from isavar.variability import volume as vol


class _Recording(SerialExecutor):
    """Serial, recording the tasks of every map_sum call (one per round)."""

    def __init__(self):
        self.calls = []

    def map_sum(self, fn, tasks, on_result=None, *, shared=None):
        tasks = list(tasks)
        self.calls.append(tasks)
        return super().map_sum(fn, tasks, on_result, shared=shared)


def _part(seed):
    """Accumulator-shaped arrays of very different magnitudes (float sums would depend on the order)."""
    rng = np.random.default_rng(seed)
    acc = vol.new_accumulator(8, 2, "c1")
    scale = 10.0 ** rng.integers(-6, 6)
    data = (rng.normal(size=acc.data.shape) + 1j * rng.normal(size=acc.data.shape)) * scale
    return (data.astype(acc.data.dtype), (rng.random(acc.weights.shape) * scale).astype(np.float32)), seed


@pytest.mark.parametrize("n", [1, 7, 8, 9, 23, 100])
def test_rounds_cover_the_items_once_and_depend_on_their_number_only(n):
    bounds = vol.round_bounds(n)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    assert len(bounds) <= vol.ROUNDS
    assert len({b - a for a, b in bounds[:-1]}) <= 1                # equal rounds but the last


def test_one_reduction_per_round_and_every_result_seen_once():
    ex = _Recording()
    items = list(range(19))
    seen, rounds = [], []
    totals = vol.accumulate_rounds(ex, _part, items, on_result=seen.append,
                                   on_round=lambda done, count, tot: rounds.append((done, count)))
    assert seen == items
    assert [len(c) for c in ex.calls] == [b - a for a, b in vol.round_bounds(len(items))]
    assert rounds == [(k + 1, len(ex.calls)) for k in range(len(ex.calls))]
    # the totals are the float64 sums, in round order, of each round's exact sums
    expect = None
    for a, b in vol.round_bounds(len(items)):
        parts = [_part(i)[0] for i in items[a:b]]
        exact = [np.sum([p[k].astype(np.complex128 if k == 0 else np.float64) for p in parts], axis=0)
                 for k in range(2)]
        expect = exact if expect is None else [e + x for e, x in zip(expect, exact)]
    for t, e in zip(totals, expect):
        np.testing.assert_allclose(t, e, rtol=1e-12, atol=1e-9)


def test_totals_are_bit_identical_for_a_pool_and_after_a_resume():
    items = list(range(13))
    ref = vol.accumulate_rounds(SerialExecutor(), _part, items)
    pool = PoolExecutor(2)
    try:
        got = vol.accumulate_rounds(pool, _part, items)
    finally:
        pool.close()
    for a, b in zip(ref, got):
        assert np.array_equal(a, b)
    saved = {}
    vol.accumulate_rounds(SerialExecutor(), _part, items,
                          on_round=lambda done, count, tot: saved.setdefault(done, [t.copy() for t in tot]))
    for done in (1, 3, len(saved) - 1):                              # resume after any round
        again = vol.accumulate_rounds(SerialExecutor(), _part, items, totals=saved[done], first_round=done)
        for a, b in zip(ref, again):
            assert np.array_equal(a, b)


def test_accumulators_from_totals():
    (data, weights), _ = _part(3)
    acc, = vol.accumulators_from([data.astype(np.complex128), weights.astype(np.float64)], 8, 2, "c1")
    assert acc.data.dtype == np.complex64 and np.array_equal(acc.data, data)
    assert np.array_equal(acc.weights, weights)
