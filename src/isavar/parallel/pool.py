"""A process-pool executor for one machine (``concurrent.futures``)."""

from __future__ import annotations

import os
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
        """Apply ``fn`` to every task in the pool; results in task order."""
        return list(self._pool.map(fn, tasks))

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
