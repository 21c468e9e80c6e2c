"""Flags shared by several subcommands, and their set-up (logging, executor, progress)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os

from isavar._logging import configure_logging
from isavar._progress import NullProgress, TqdmProgress


def add_verbosity_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``-v/--verbose`` and ``-q/--quiet``."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail in the console log")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")


#: Most processes the pool executor starts unless ``--workers`` says otherwise (memory grows with them).
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """The CPU cores this process may use (its affinity mask), at most :data:`MAX_DEFAULT_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                                   # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def _checked(text: str, convert, ok, kind: str, problem: str):
    """``convert(text)`` for an argparse type, refused with one line unless ``ok(value)``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {problem}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--workers``, ``--chunk-size``, ...)."""
    return _checked(text, int, lambda v: v >= 1, "a whole number", "at least 1")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (pixel sizes, ...)."""
    return _checked(text, float, lambda v: 0 < v < float("inf"), "a number", "a positive number")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (random seeds)."""
    return _checked(text, int, lambda v: v >= 0, "a whole number", ">= 0")


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and infinity refused; ranges are checked by each command)."""
    return _checked(text, float, math.isfinite, "a number", "a finite number")


@contextlib.contextmanager
def naming_os_errors(path):
    """Give operating-system errors that name no file (a full disk while writing) the output's name."""
    try:
        yield
    except OSError as exc:
        if not exc.filename:
            exc.filename = str(path)
        raise


@contextlib.contextmanager
def executor_from_args(args: argparse.Namespace):
    """The executor of ``--executor``/``--workers``, with logging configured; stopped at the end.

    ``--workers`` beyond the cores available is capped (with a warning). On success the executor is
    closed normally; after an error or Ctrl-C its workers are stopped at once.
    """
    from isavar.parallel import make_executor

    executor = make_executor(args.executor, args.workers)
    setup_logging(args, is_root=executor.is_root())
    requested = getattr(executor, "requested_workers", None)
    if requested is not None and requested > executor.workers:
        logging.getLogger("isavar").warning("--workers %d is more than the %d cores available; using %d",
                                            requested, executor.workers, executor.workers)
    ok = False
    try:
        yield executor
        ok = True
    finally:
        stop = getattr(executor, "close" if ok else "terminate", None) or getattr(executor, "close", None)
        if stop is not None:
            stop()


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--executor`` and ``--workers`` (how the work is spread; never changes results)."""
    parser.add_argument("--executor", choices=["auto", "serial", "pool", "mpi"], default="auto",
                        help="serial, a local process pool, or MPI (auto: MPI under mpirun, else pool "
                             "when --workers > 1); results do not depend on this")
    n = default_workers()
    parser.add_argument("--workers", type=positive_int, default=n,
                        help=f"processes for the pool executor (default: the CPU cores available, at most "
                             f"{MAX_DEFAULT_WORKERS}; here {n})")


def setup_logging(args: argparse.Namespace, *, log_file=None, is_root: bool = True) -> None:
    """Configure logging from ``-v``/``-q`` and an optional log file."""
    configure_logging(verbosity=getattr(args, "verbose", 0), quiet=getattr(args, "quiet", False),
                      log_file=log_file, is_root=is_root)


def make_progress(args: argparse.Namespace, *, is_root: bool = True):
    """A tqdm progress reporter on the root process unless ``--quiet``; a null one otherwise."""
    if not is_root or getattr(args, "quiet", False):
        return NullProgress()
    return TqdmProgress()


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--apix`` and ``--project-dir`` (how the input particle file is read and outputs name images)."""
    parser.add_argument("--apix", type=positive_float, default=None,
                        help="pixel size in Å, for inputs that do not state it (or to replace the file's)")
    parser.add_argument("--project-dir", dest="project_dir", default=None,
                        help="RELION project directory: relative image names in STAR files are read from it "
                             "(then from the STAR's folder and its parents), and written STAR files name "
                             "images relative to it (default: the current directory, as RELION does)")


def project_dir(args: argparse.Namespace):
    """The RELION project directory of a command: ``--project-dir`` or the current directory."""
    from pathlib import Path

    value = getattr(args, "project_dir", None)
    return Path(value) if value else Path.cwd()
