"""The serial executor: a plain loop; the default for the library and the tests."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np


class SerialExecutor:
    """Run every task in this process, in order."""

    rank = 0
    size = 1
    workers = 1

    def is_root(self) -> bool:
        """Always True."""
        return True

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> list:
        """Apply ``fn`` to every task in order."""
        return [fn(t) for t in tasks]

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
