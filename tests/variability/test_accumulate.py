"""The one accumulation loop: results summed in item order, waves of executor.workers tasks."""

from __future__ import annotations

import numpy as np

from isavar.parallel.serial import SerialExecutor
from isavar.variability.volume import accumulate_in_waves, new_accumulator


class _Workers(SerialExecutor):
    def __init__(self, workers):
        super().__init__()
        self.workers = workers
        self.waves = []

    def map(self, fn, tasks):
        tasks = list(tasks)
        self.waves.append(len(tasks))
        return super().map(fn, tasks)


def _part(seed):
    rng = np.random.default_rng(seed)
    acc = new_accumulator(8, 2, "c1")
    return seed, rng.normal(size=acc.data.shape).astype(acc.data.dtype), rng.random(acc.weights.shape)


def test_sums_are_in_item_order_and_waves_follow_the_workers():
    items = list(range(7))
    sums = []
    for workers in (1, 3):
        ex = _Workers(workers)
        acc = new_accumulator(8, 2, "c1")
        seen, waves = [], []
        accumulate_in_waves(ex, _part, items, (acc,), lambda r: (r[1:],), on_result=lambda r: seen.append(r[0]),
                            on_wave=waves.append)
        assert seen == items
        assert waves == (list(range(1, 8)) if workers == 1 else [3, 6, 7])
        assert ex.waves == ([1] * 7 if workers == 1 else [3, 3, 1])
        sums.append((acc.data.copy(), acc.weights.copy()))
    ref_d, ref_w = np.zeros_like(sums[0][0]), np.zeros_like(sums[0][1])
    for i in items:                                          # the same sequence of additions, one by one
        _, d, w = _part(i)
        ref_d += d
        ref_w += w
    for d, w in sums:
        assert np.array_equal(d, ref_d) and np.array_equal(w, ref_w)
