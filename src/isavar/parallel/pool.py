"""A process-pool executor for one machine (``concurrent.futures``)."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np


class PoolExecutor:
    """Run tasks in ``workers`` worker processes on this machine.

    Task functions and their arguments must be picklable (module-level
    functions, arrays, dataclasses). Results come back in task order, so the
    answer is the same as with :class:`~isavar.parallel.serial.SerialExecutor`.

    Parameters
    ----------
    workers : int, optional
        Number of processes; default: the CPUs available to this process.
    """

    rank = 0
    size = 1

    def __init__(self, workers: int | None = None):
        self.workers = workers or len(os.sched_getaffinity(0))
        self._pool = ProcessPoolExecutor(max_workers=self.workers)

    def is_root(self) -> bool:
        """Always True (one controlling process)."""
        return True

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> list:
        """Apply ``fn`` to every task in the pool; results in task order.

        At most ``2 * workers + 2`` tasks are submitted at a time (a sliding window), so a generator of
        tasks is consumed lazily and the data in flight stay bounded.
        """
        window = 2 * self.workers + 2
        pending: deque = deque()
        results = []
        for task in tasks:
            if len(pending) >= window:
                results.append(pending.popleft().result())
            pending.append(self._pool.submit(fn, task))
        while pending:
            results.append(pending.popleft().result())
        return results

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` unchanged (one controlling process)."""
        return array

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Return ``obj`` unchanged."""
        return obj

    def barrier(self) -> None:
        """Nothing to wait for."""

    def close(self) -> None:
        """Shut the pool down."""
        self._pool.shutdown()
