"""A process-pool executor for one machine (``concurrent.futures``).

Workers never outlive their parent: each runs a watchdog thread that ends the worker as soon as its
parent process is gone (killed by ``kill -9`` or the out-of-memory killer, for instance), so no orphaned
worker holds memory. Workers ignore SIGINT: a Ctrl-C in the terminal reaches the controlling process
alone, which stops the workers (:meth:`PoolExecutor.terminate`) and reports one line.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np

from isavar.parallel.reduction import sum_locally

log = logging.getLogger(__name__)

#: Seconds between two checks of a worker's parent.
PARENT_CHECK_INTERVAL = 0.5


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                                   # not on Linux
        return max(1, os.cpu_count() or 1)


def _watch_parent(parent_pid: int, interval: float) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)                                      # the parent died: the worker has nobody to serve
        time.sleep(interval)


def _worker_init(parent_pid: int, interval: float) -> None:
    """Set up a worker: ignore SIGINT and exit when the parent process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, interval), daemon=True,
                     name="isavar-parent-watch").start()


#: The shared object of the current call in a worker: ``{key: object}`` (one entry at most).
_WORKER_SHARED: dict = {}


def _shared_in_worker(key: str, path: str):
    """The shared object ``key``, loaded from ``path`` on the first task of the call this worker runs."""
    if key not in _WORKER_SHARED:
        _WORKER_SHARED.clear()                            # the previous call's object is no longer needed
        with open(path, "rb") as f:
            _WORKER_SHARED[key] = pickle.load(f)
    return _WORKER_SHARED[key]


def _call_with_shared(key: str, path: str, fn: Callable[[Any, Any], Any], task: Any) -> Any:
    return fn(_shared_in_worker(key, path), task)


class _SharedFile:
    """A read-only object pickled once into a temporary file for the length of one call.

    Each task then carries the file's name and a key (about 100 bytes) instead of the object, and each
    worker unpickles the object once, on the first task of the call it runs (:func:`_shared_in_worker`).
    The file is removed when the call ends (normally or not).
    """

    def __init__(self, obj: Any):
        self.key = uuid.uuid4().hex
        fd, self.path = tempfile.mkstemp(prefix="isavar-shared-", suffix=".pkl")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
            self.nbytes = os.path.getsize(self.path)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class PoolExecutor:
    """Run tasks in ``workers`` worker processes on this machine.

    Task functions and their arguments must be picklable (module-level
    functions, arrays, dataclasses). Results come back in task order, so the
    answer is the same as with :class:`~isavar.parallel.serial.SerialExecutor`.

    Parameters
    ----------
    workers : int, optional
        Number of processes; default: the CPUs available to this process. More
        than that are capped at the cores available (:attr:`requested_workers`
        keeps the number asked for, so the caller can warn).
    """

    rank = 0
    size = 1

    def __init__(self, workers: int | None = None):
        cores = available_cores()
        self.requested_workers = int(workers or cores)
        if self.requested_workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.requested_workers}")
        self.workers = min(self.requested_workers, cores)
        self._pool = ProcessPoolExecutor(max_workers=self.workers, initializer=_worker_init,
                                         initargs=(os.getpid(), PARENT_CHECK_INTERVAL))

    def is_root(self) -> bool:
        """Always True (one controlling process)."""
        return True

    def imap(self, fn: Callable[..., Any], tasks: Iterable[Any], *, shared: Any = None):
        """Apply ``fn`` to every task in the pool; yield the results in task order.

        At most ``2 * workers + 2`` tasks are submitted at a time (a sliding window), so a generator of
        tasks is consumed lazily and the data in flight stay bounded.

        With ``shared`` (not None), each task runs ``fn(shared, task)``: ``shared`` is pickled once for the
        call into a temporary file and each worker unpickles it once, on its first task of the call, so a
        large read-only context (per-particle tables, prepared references) is not sent with every task.
        ``shared`` must not change during the call. The file is written where :mod:`tempfile` puts
        temporary files (``TMPDIR``); if it cannot be written, ``shared`` goes with every task (a warning).
        """
        handle = None
        if shared is not None:
            try:
                handle = _SharedFile(shared)
            except OSError as exc:                 # e.g. a full temporary directory: send it with every task
                log.warning("cannot write the shared task context to %s (%s); it is sent with every task",
                            tempfile.gettempdir(), exc.strerror or exc)
                fn = functools.partial(fn, shared)
        window = 2 * self.workers + 2
        pending: deque = deque()
        try:
            for task in tasks:
                if len(pending) >= window:
                    yield pending.popleft().result()
                if handle is None:
                    pending.append(self._pool.submit(fn, task))
                else:
                    pending.append(self._pool.submit(_call_with_shared, handle.key, handle.path, fn, task))
            while pending:
                yield pending.popleft().result()
        finally:                                   # all results taken, or the caller gave up (error, Ctrl-C)
            for future in pending:
                future.cancel()                    # the results of tasks still running are never looked at
            if handle is not None:
                handle.remove()

    def map(self, fn: Callable[..., Any], tasks: Iterable[Any], *, shared: Any = None, cost=None) -> list:
        """Apply ``fn`` to every task in the pool; results in task order (see :meth:`imap`, ``shared``).

        ``cost`` is not needed: a free worker takes the next task."""
        return list(self.imap(fn, tasks, shared=shared))

    def map_sum(self, fn: Callable[..., Any], tasks: Iterable[Any], on_result=None, *,
                shared: Any = None, exact: bool = False, cost=None):
        """Sum the arrays of every task's ``(arrays, extra)`` exactly; ``on_result(extra)`` in task order.

        Each result is added as it arrives (bounded memory); the totals are bit-identical to a serial
        run's (:mod:`isavar.parallel.reduction`). ``None`` without tasks. ``shared``: as for :meth:`imap`
        (each task runs ``fn(shared, task)``; ``shared`` reaches each worker once per call). ``exact=True``:
        the :class:`~isavar.parallel.reduction.ExactSum` itself (its limbs, not rounded to float64).
        """
        total = sum_locally(self.imap(fn, tasks, shared=shared), on_result)
        return total if (exact or total is None) else total.values()

    def gather(self, obj: Any, root: int = 0) -> list:
        """``[obj]`` (one controlling process)."""
        return [obj]

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` unchanged (one controlling process)."""
        return array

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Return ``obj`` unchanged."""
        return obj

    def barrier(self) -> None:
        """Nothing to wait for."""

    def close(self) -> None:
        """Shut the pool down (waits for running tasks)."""
        self._pool.shutdown()

    def terminate(self) -> None:
        """Stop at once: cancel pending tasks and end the worker processes (after an error or Ctrl-C)."""
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        writer = getattr(getattr(self._pool, "_result_queue", None), "_writer", None)   # shutdown forgets it
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
        for proc in processes:
            proc.join(timeout=10)
        # A worker stopped (Ctrl-C reaches the whole process group) while sending a result leaves half a
        # message in the result pipe: the pool's manager thread then waits for the rest forever, and the
        # interpreter waits for that thread at exit. With every worker gone, closing this process's write
        # end of the pipe ends that read with EOF; the thread then marks the pool broken and stops.
        if writer is not None and not any(proc.is_alive() for proc in processes):
            try:
                writer.close()
            except OSError:
                pass
