"""The executor protocol: how work is spread, never what is computed."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import numpy as np


class Executor(Protocol):
    """Runs tasks and combines arrays across workers.

    ``map`` returns the results of *all* tasks, in task order, on every
    process (serial and pool trivially; MPI by gathering and broadcasting), so
    algorithms never look at ranks.
    """

    rank: int
    size: int

    def is_root(self) -> bool:
        """True on the process that writes files and logs."""

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> list:
        """Apply ``fn`` to every task; results in task order."""

    def map_sum(self, fn: Callable[[Any], Any], tasks: Iterable[Any], on_result=None) -> list | None:
        """Exact, order-independent sum of the arrays of each task's ``(arrays, extra)`` result.

        The totals (float64/complex128, on every process) are bit-identical for any number of workers or
        ranks; ``on_result(extra)`` runs where the result is (in task order there). One reduction under MPI.
        """

    def gather(self, obj: Any, root: int = 0) -> list | None:
        """Every process's ``obj`` at ``root`` (a list in rank order), ``None`` elsewhere."""

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over processes (identity for one process)."""

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Send ``obj`` from ``root`` to every process."""

    def barrier(self) -> None:
        """Wait for every process."""
