"""Flags shared by several subcommands, and their set-up (logging, executor, progress)."""

from __future__ import annotations

import argparse
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--executor`` and ``--workers`` (how the work is spread; never changes results)."""
    parser.add_argument("--executor", choices=["auto", "serial", "pool", "mpi"], default="auto",
                        help="serial, a local process pool, or MPI (auto: MPI under mpirun, else pool "
                             "when --workers > 1); results do not depend on this")
    n = default_workers()
    parser.add_argument("--workers", type=_positive_int, default=n,
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


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--apix`` and ``--project-dir`` (how the input particle file is read and outputs name images)."""
    parser.add_argument("--apix", type=_positive_float, default=None,
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
