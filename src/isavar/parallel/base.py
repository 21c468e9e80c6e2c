"""The executor protocol: how work is spread, never what is computed."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Protocol

import numpy as np


def with_shared(fn: Callable[..., Any], shared: Any) -> Callable[[Any], Any]:
    """``fn`` itself, or ``fn(shared, task)`` as a one-argument task function when ``shared`` is not None.

    What the serial and MPI executors do with ``shared`` (every process already holds it); the pool sends
    it to each worker once per call instead (:class:`isavar.parallel.pool.PoolExecutor`).
    """
    return fn if shared is None else functools.partial(fn, shared)


class Executor(Protocol):
    """Runs tasks and combines arrays across workers.

    ``map`` returns the results of *all* tasks, in task order, on every
    process (serial and pool trivially; MPI by gathering and broadcasting), so
    algorithms never look at ranks.

    ``shared``: ``map`` and ``map_sum`` (and the pool's ``imap``) take an optional read-only object that
    every task needs (a per-particle table, prepared references); each task then runs
    ``fn(shared, task)``. The object reaches each process once per call instead of once per task: a pool
    worker unpickles it on its first task of the call, MPI ranks and the serial executor already hold it.
    The results are the same as with ``functools.partial(fn, shared)``.
    """

    rank: int
    size: int

    def is_root(self) -> bool:
        """True on the process that writes files and logs."""

    def map(self, fn: Callable[..., Any], tasks: Iterable[Any], *, shared: Any = None, cost=None) -> list:
        """Apply ``fn`` to every task (``fn(shared, task)`` with ``shared``); results in task order.

        ``cost`` (optional, one non-negative number per task): the relative cost of each task. Executors
        that hand out fixed blocks of tasks (MPI) make the blocks of near-equal cost; the results never
        depend on it."""

    def map_sum(self, fn: Callable[..., Any], tasks: Iterable[Any], on_result=None, *,
                shared: Any = None, exact: bool = False, cost=None):
        """Exact, order-independent sum of the arrays of each task's ``(arrays, extra)`` result.

        The totals (float64/complex128, on every process) are bit-identical for any number of workers or
        ranks; ``on_result(extra)`` runs where the result is (in task order there). One reduction under MPI.
        ``exact=True`` returns the :class:`~isavar.parallel.reduction.ExactSum` (limbs) instead, so that
        several calls can be added exactly (``merge``) before rounding once. ``None`` without tasks.
        ``cost``: as for :meth:`map`.
        """

    def gather(self, obj: Any, root: int = 0) -> list | None:
        """Every process's ``obj`` at ``root`` (a list in rank order), ``None`` elsewhere."""

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over processes (identity for one process)."""

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Send ``obj`` from ``root`` to every process."""

    def barrier(self) -> None:
        """Wait for every process."""
