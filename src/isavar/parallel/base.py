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

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over processes (identity for one process)."""

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Send ``obj`` from ``root`` to every process."""

    def barrier(self) -> None:
        """Wait for every process."""
