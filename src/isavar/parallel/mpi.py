"""An MPI executor over mpi4py (imported only here, only when this executor is built)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from isavar.parallel.base import with_shared
from isavar.parallel.partition import balanced_ranges, weighted_ranges
from isavar.parallel.reduction import ExactSum, sum_locally


class MpiExecutor:
    """Spread tasks over the ranks of ``MPI.COMM_WORLD``.

    Each rank runs a contiguous block of the task list, of equal length or, with a ``cost`` per task, of
    near-equal total cost; results are gathered and broadcast so every rank sees all results in task order.
    """

    def __init__(self):
        from mpi4py import MPI  # noqa: PLC0415 - the only mpi4py import in the package

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.workers = self.size

    def is_root(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def _blocks(self, n_tasks: int, cost) -> list[tuple[int, int]]:
        """Every rank's contiguous block of ``n_tasks`` tasks (equal counts, or equal total ``cost``)."""
        if cost is None:
            return balanced_ranges(n_tasks, self.size)
        if len(cost) != n_tasks:
            raise ValueError(f"{len(cost)} task costs for {n_tasks} tasks")
        return weighted_ranges(cost, self.size)

    def map(self, fn: Callable[..., Any], tasks: Iterable[Any], *, shared: Any = None, cost=None) -> list:
        """Run this rank's block of tasks; return all results in task order on every rank.

        With ``shared`` each task runs ``fn(shared, task)``; every rank holds its own ``shared``, nothing
        of it is sent. ``cost``: relative cost of each task; blocks then have near-equal total cost.
        """
        fn = with_shared(fn, shared)
        tasks = list(tasks)
        start, stop = self._blocks(len(tasks), cost)[self.rank]
        mine = [fn(t) for t in tasks[start:stop]]
        blocks = self.comm.allgather(mine)
        return [r for block in blocks for r in block]

    def map_sum(self, fn: Callable[..., Any], tasks: Iterable[Any], on_result=None, *,
                shared: Any = None, exact: bool = False, cost=None):
        """Sum the arrays of every task's ``(arrays, extra)`` over all ranks with one reduction.

        Each rank runs its block of tasks and adds their arrays exactly (fixed point,
        :mod:`isavar.parallel.reduction`); one ``Allreduce`` of the integer limbs then gives every rank
        the same totals, bit-identical to a serial run's whatever the number of ranks. ``on_result(extra)``
        is called on the rank that ran the task, in task order; nothing per task is sent between ranks.
        Returns ``None`` without tasks. With ``shared`` each task runs ``fn(shared, task)`` (every rank
        holds its own ``shared``; nothing of it is sent). ``exact=True``: the reduced
        :class:`~isavar.parallel.reduction.ExactSum` itself (the same limbs on every rank). ``cost``: as for
        :meth:`map`.
        """
        fn = with_shared(fn, shared)
        tasks = list(tasks)
        blocks = self._blocks(len(tasks), cost)
        start, stop = blocks[self.rank]
        local = sum_locally((fn(t) for t in tasks[start:stop]), on_result)
        # the layout comes from the first rank with tasks (with costs, rank 0's block may be empty)
        first = next((r for r, (a, b) in enumerate(blocks) if b > a), 0)
        layout = self.comm.bcast(None if local is None else local.layout, root=first)
        if layout is None:
            return None
        if local is None:
            local = ExactSum(layout)
        limbs = np.empty_like(local.limbs)
        self.comm.Allreduce(local.limbs, limbs, op=self._mpi.SUM)
        total = ExactSum(layout)
        total.merge_limbs(limbs, len(tasks))
        return total if exact else total.values()

    def gather(self, obj: Any, root: int = 0) -> list | None:
        """Every rank's ``obj`` in rank order at ``root``; ``None`` on the other ranks."""
        return self.comm.gather(obj, root=root)

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (buffer-based)."""
        array = np.ascontiguousarray(array)
        out = np.empty_like(array)
        self.comm.Allreduce(array, out, op=self._mpi.SUM)
        return out

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a picklable object from ``root``."""
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        """MPI barrier."""
        self.comm.Barrier()

    def close(self) -> None:
        """Nothing to release (MPI is finalised at exit)."""
