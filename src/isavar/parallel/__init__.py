"""How work is spread over processes: serial, a local process pool, or MPI."""

from __future__ import annotations

import os

from isavar.parallel.serial import SerialExecutor


def make_executor(kind: str = "auto", workers: int | None = None):
    """Build an executor.

    Parameters
    ----------
    kind : {"auto", "serial", "pool", "mpi"}
        ``auto`` uses MPI when started under ``mpirun`` with more than one rank
        (``OMPI_COMM_WORLD_SIZE``/``PMI_SIZE``), else a pool when ``workers``
        exceeds 1, else serial.
    workers : int, optional
        Processes for the pool executor.

    Returns
    -------
    Executor
    """
    if kind == "auto":
        mpi_size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
        kind = "mpi" if mpi_size > 1 else ("pool" if (workers or 1) > 1 else "serial")
    if kind == "serial":
        return SerialExecutor()
    if kind == "pool":
        from isavar.parallel.pool import PoolExecutor

        return PoolExecutor(workers)
    if kind == "mpi":
        from isavar.parallel.mpi import MpiExecutor

        return MpiExecutor()
    raise ValueError(f"unknown executor {kind!r} (serial, pool, mpi or auto)")


def map_in_windows(executor, fn, tasks, window: int = 4):
    """``executor.map(fn, ...)`` over ``window`` tasks at a time, yielding results in task order.

    Bounds the data in flight (a process pool otherwise receives every task's arguments at once). With
    ``executor=None`` the tasks run here, one by one. Under MPI every rank must make the same calls.
    """
    if executor is None:
        yield from map(fn, tasks)
        return
    batch = []
    for task in tasks:
        batch.append(task)
        if len(batch) == window:
            yield from executor.map(fn, batch)
            batch = []
    if batch:
        yield from executor.map(fn, batch)
