"""``shared=``: a read-only context reaches each worker once per call, with the results of ``partial(fn, shared)``."""

from __future__ import annotations

import functools
import os
import pickle
import tempfile

import numpy as np
import pytest

from isavar.parallel.pool import PoolExecutor
from isavar.parallel.serial import SerialExecutor

#: Times a :class:`_Context` was unpickled in this process.
LOADS = [0]


class _Context:
    """A large read-only context that counts its unpicklings in the process that unpickles it."""

    def __init__(self, seed: int, n: int = 50_000):
        self.table = np.random.default_rng(seed).normal(size=n)

    def __getstate__(self):
        return {"table": self.table}

    def __setstate__(self, state):
        LOADS[0] += 1
        self.table = state["table"]


def _sum_task(ctx: _Context, seed: int):
    """Arrays of very different magnitudes (float sums would depend on the order) from the context."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, ctx.table.size, size=12)
    return (ctx.table[rows].reshape(3, 4) * 10.0 ** rng.integers(-6, 6), ctx.table[rows[:2]] + 1j), seed


def _where_task(ctx: _Context, item: int):
    """(worker pid, unpicklings so far in it, a value of the context)."""
    return os.getpid(), LOADS[0], float(ctx.table[item])


def _failing_task(ctx: _Context, item: int):
    if item == 3:
        raise RuntimeError("task 3 failed")
    return float(ctx.table[item])


@pytest.fixture
def pool(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))        # where the pool writes the shared file
    ex = PoolExecutor(2)
    yield ex
    ex.close()


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.glob("isavar-shared-*"))


def test_serial_and_pool_give_the_bits_of_partial(pool, tmp_path):
    ctx = _Context(1)
    want = SerialExecutor().map_sum(functools.partial(_sum_task, ctx), range(17))
    seen = []
    for got in (SerialExecutor().map_sum(_sum_task, range(17), shared=ctx),
                pool.map_sum(_sum_task, range(17), on_result=seen.append, shared=ctx)):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(want, got, strict=True))
    assert seen == list(range(17))
    assert SerialExecutor().map(_where_task, [5, 2], shared=ctx)[1][2] == ctx.table[2]
    assert [r[2] for r in pool.map(_where_task, range(9), shared=ctx)] == ctx.table[:9].tolist()
    assert pool.map_sum(_sum_task, [], shared=ctx) is None
    assert _leftovers(tmp_path) == []                                # the file lives for one call


def test_each_worker_unpickles_the_context_once_per_call(pool):
    ctx = _Context(2)
    per_task = len(pickle.dumps((functools.partial(_where_task, ctx), 0)))
    assert per_task > ctx.table.nbytes                              # what every task carried before
    loads_by_call = []
    for _ in range(2):
        results = pool.map(_where_task, range(40), shared=ctx)
        loads: dict = {}
        for pid, count, _value in results:
            loads.setdefault(pid, set()).add(count)
        assert all(len(v) == 1 for v in loads.values()), loads     # no task of the call unpickled it again
        loads_by_call.append({pid: v.pop() for pid, v in loads.items()})
    first, second = loads_by_call
    # a worker that ran tasks of both calls unpickled the context once more, for the second call
    assert all(second[pid] == first[pid] + 1 for pid in set(first) & set(second))
    assert all(v >= 1 for v in first.values())


def test_a_failing_task_propagates_and_the_file_is_removed(pool, tmp_path):
    ctx = _Context(3, n=100)
    with pytest.raises(RuntimeError, match="task 3 failed"):
        pool.map(_failing_task, range(8), shared=ctx)
    assert _leftovers(tmp_path) == []
    it = pool.imap(_failing_task, range(100), shared=ctx)           # a consumer that stops early
    assert next(it) == ctx.table[0]
    assert _leftovers(tmp_path) != []
    it.close()
    assert _leftovers(tmp_path) == []
    assert pool.map(_failing_task, [0, 1], shared=ctx) == ctx.table[:2].tolist()   # the pool still works


def test_without_a_writable_temporary_directory_the_context_goes_with_every_task(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    ctx = _Context(4, n=100)
    ex = PoolExecutor(2)
    try:
        with caplog.at_level("WARNING", logger="isavar.parallel.pool"):
            got = ex.map(_where_task, range(6), shared=ctx)
    finally:
        ex.close()
    assert [r[2] for r in got] == ctx.table[:6].tolist()
    assert "sent with every task" in caplog.text
