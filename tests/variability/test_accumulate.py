"""The one accumulation loop: fixed rounds of exact reductions, bit-identical for any executor and on resume."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.parallel.pool import PoolExecutor
from isavar.parallel.reduction import ExactSum, layout_of
from isavar.parallel.serial import SerialExecutor
from isavar.variability import volume as vol


class _Recording(SerialExecutor):
    """Serial, recording the tasks of every map_sum call (one per round)."""

    def __init__(self):
        self.calls = []

    def map_sum(self, fn, tasks, on_result=None, *, shared=None, exact=False):
        tasks = list(tasks)
        self.calls.append(tasks)
        return super().map_sum(fn, tasks, on_result, shared=shared, exact=exact)


def _part(seed):
    """Accumulator-shaped arrays of very different magnitudes (float sums would depend on the order)."""
    rng = np.random.default_rng(seed)
    acc = vol.new_accumulator(8, 2, "c1")
    scale = 10.0 ** rng.integers(-6, 6)
    data = (rng.normal(size=acc.data.shape) + 1j * rng.normal(size=acc.data.shape)) * scale
    return (data.astype(acc.data.dtype), (rng.random(acc.weights.shape) * scale).astype(np.float32)), seed


@pytest.mark.parametrize("n", [1, 7, 8, 9, 23, 100])
@pytest.mark.parametrize("processes", [1, 2, 3, 16])
def test_rounds_cover_the_items_once_and_give_every_process_a_share(n, processes):
    bounds = vol.round_bounds(n, processes=processes)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    assert len(bounds) <= vol.ROUNDS
    widths = {b - a for a, b in bounds[:-1]}
    assert len(widths) <= 1                                          # equal rounds but the last
    assert all(w % processes == 0 for w in widths)                   # each process the same share
    least = -(-n // vol.ROUNDS)                                      # tasks per round for ROUNDS rounds
    width = bounds[0][1] - bounds[0][0]
    assert width >= min(n, least) and (len(bounds) == 1 or width - processes < least)   # no wider than needed
    resumed = vol.round_bounds(n, processes=processes, start=bounds[0][1])
    assert resumed == bounds[1:]


def test_one_reduction_per_round_and_every_result_seen_once():
    ex = _Recording()
    items = list(range(19))
    seen, rounds = [], []
    totals = vol.accumulate_rounds(ex, _part, items, on_result=seen.append,
                                   on_round=lambda done, count, tot: rounds.append((done, count, tot.count)))
    assert seen == items
    bounds = vol.round_bounds(len(items))
    assert [len(c) for c in ex.calls] == [b - a for a, b in bounds]
    assert rounds == [(b, len(items), b) for _, b in bounds]
    # the totals are the sums of every part, rounded once
    parts = [_part(i)[0] for i in items]
    expect = [np.sum([p[k].astype(np.complex128 if k == 0 else np.float64) for p in parts], axis=0) for k in range(2)]
    for t, e in zip(totals, expect):
        np.testing.assert_allclose(t, e, rtol=1e-12, atol=1e-9)


class _Processes(_Recording):
    """Serial, recording, claiming ``workers`` processes (the rounds are sized for them)."""

    def __init__(self, workers):
        super().__init__()
        self.workers = workers


def test_totals_are_the_same_bits_whatever_the_rounds_the_executor_or_a_resume():
    items = list(range(13))
    ref = vol.accumulate_rounds(SerialExecutor(), _part, items)
    one_round = ReductionSum(items)
    for a, b in zip(ref, one_round):
        assert a.tobytes() == b.tobytes()                           # 8 rounds = 1 round: sums added exactly
    for workers in (2, 5):
        ex = _Processes(workers)
        got = vol.accumulate_rounds(ex, _part, items)
        assert all(len(c) % workers == 0 for c in ex.calls[:-1]) and len(ex.calls) < 8
        assert all(a.tobytes() == b.tobytes() for a, b in zip(ref, got))
    pool = PoolExecutor(2)
    try:
        got = vol.accumulate_rounds(pool, _part, items)
    finally:
        pool.close()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ref, got))
    saved = {}
    vol.accumulate_rounds(SerialExecutor(), _part, items,
                          on_round=lambda done, count, tot: saved.setdefault(done, tot.to_arrays("total")))
    for done, arrays in saved.items():                              # resume after any round, on 1 or 3 processes
        for ex in (SerialExecutor(), _Processes(3)):
            again = vol.accumulate_rounds(ex, _part, items, total=ExactSum.from_arrays(arrays, "total"),
                                          items_done=done)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(ref, again))


def ReductionSum(items):
    """The totals of every part summed in one exact sum (one round)."""
    total = None
    for i in items:
        arrays, _ = _part(i)
        total = total or ExactSum(layout_of(arrays))
        total.add(arrays)
    return total.values()


def test_accumulators_from_totals():
    (data, weights), _ = _part(3)
    acc, = vol.accumulators_from([data.astype(np.complex128), weights.astype(np.float64)], 8, 2, "c1")
    assert acc.data.dtype == np.complex64 and np.array_equal(acc.data, data)
    assert np.array_equal(acc.weights, weights)
