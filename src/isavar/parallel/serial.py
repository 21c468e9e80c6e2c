"""The serial executor: a plain loop; the default for the library and the tests."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from isavar.parallel.base import with_shared
from isavar.parallel.reduction import sum_locally


class SerialExecutor:
    """Run every task in this process, in order."""

    rank = 0
    size = 1
    workers = 1

    def is_root(self) -> bool:
        """Always True."""
        return True

    def map(self, fn: Callable[..., Any], tasks: Iterable[Any], *, shared: Any = None, cost=None) -> list:
        """Apply ``fn`` to every task in order (``fn(shared, task)`` with ``shared``; ``cost`` is not needed)."""
        fn = with_shared(fn, shared)
        return [fn(t) for t in tasks]

    def map_sum(self, fn: Callable[..., Any], tasks: Iterable[Any], on_result=None, *,
                shared: Any = None, exact: bool = False, cost=None):
        """Sum the arrays of every task's ``(arrays, extra)`` exactly; ``on_result(extra)`` in task order.

        Returns the float64/complex128 totals (``None`` without tasks); see :mod:`isavar.parallel.reduction`.
        With ``shared``, each task runs ``fn(shared, task)``. ``exact=True``: the
        :class:`~isavar.parallel.reduction.ExactSum` itself (its limbs, not rounded to float64).
        """
        fn = with_shared(fn, shared)
        total = sum_locally((fn(t) for t in tasks), on_result)
        return total if (exact or total is None) else total.values()

    def gather(self, obj: Any, root: int = 0) -> list:
        """``[obj]`` (one process)."""
        return [obj]

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` unchanged."""
        return array

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Return ``obj`` unchanged."""
        return obj

    def barrier(self) -> None:
        """Nothing to wait for."""

    def close(self) -> None:
        """Nothing to release."""
