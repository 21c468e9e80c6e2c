"""Logging set-up for the command line, and a run's log file.

Library modules only call ``logging.getLogger(__name__)``; :func:`configure_logging`
is called by the CLI alone, and a workflow attaches its output directory's
``log.txt`` for the duration of one run with :func:`run_log`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(*, verbosity: int = 0, quiet: bool = False, log_file: str | Path | None = None,
                      is_root: bool = True) -> None:
    """Configure the ``isavar`` logger (console and optional file); called only by the CLI.

    Parameters
    ----------
    verbosity : int
        0 = INFO, 1 or more = DEBUG.
    quiet : bool
        Only warnings and errors on the console.
    log_file : path, optional
        Also write every message (DEBUG and up) to this file.
    is_root : bool
        False on non-root MPI ranks: their console output is limited to errors.
    """
    logger = logging.getLogger("isavar")
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler()
    if not is_root:
        console.setLevel(logging.ERROR)
    elif quiet:
        console.setLevel(logging.WARNING)
    else:
        console.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity == 0 else _FORMAT))
    logger.addHandler(console)
    if log_file is not None and is_root:
        add_log_file(log_file)
    logger.propagate = False


def _file_handler(path: Path) -> logging.FileHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def add_log_file(log_file: str | Path) -> None:
    """Add a DEBUG-level file handler to the ``isavar`` logger (appending)."""
    logging.getLogger("isavar").addHandler(_file_handler(Path(log_file)))


class RunLog:
    """The log file attached by :func:`run_log`; :meth:`detach` ends it early (before removing its folder)."""

    def __init__(self, logger: logging.Logger, handler: logging.Handler | None, level: int):
        self._logger, self._handler, self._level = logger, handler, level

    def detach(self) -> None:
        """Remove and close this run's handler and restore the logger's level (idempotent)."""
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        self._logger.setLevel(self._level)


@contextlib.contextmanager
def run_log(log_file: str | Path, *, enabled: bool = True):
    """Write the ``isavar`` logger's messages (DEBUG and up) to ``log_file`` for the duration of a run.

    The file handler is added (appending) unless one for the same file is already attached
    (the CLI's), the logger's level is lowered to DEBUG if needed, and both are restored on
    exit, so a library call leaves the logger as it found it.

    Parameters
    ----------
    log_file : path
        The run's ``log.txt``.
    enabled : bool
        False on the processes that do not write (non-root MPI ranks): nothing changes.

    Yields
    ------
    RunLog
    """
    logger = logging.getLogger("isavar")
    level = logger.level
    handler = None
    if enabled:
        target = str(Path(log_file).resolve())
        if not any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
            handler = _file_handler(Path(log_file))
            logger.addHandler(handler)
        if level == logging.NOTSET or level > logging.DEBUG:
            logger.setLevel(logging.DEBUG)
    scope = RunLog(logger, handler, level)
    try:
        yield scope
    finally:
        scope.detach()


def close_log_files() -> None:
    """Close and remove the file handlers of the ``isavar`` logger."""
    logger = logging.getLogger("isavar")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
