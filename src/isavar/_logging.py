"""Logging set-up for the command line. Library modules only call ``logging.getLogger(__name__)``."""

from __future__ import annotations

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


def add_log_file(log_file: str | Path) -> None:
    """Add a DEBUG-level file handler to the ``isavar`` logger (appending)."""
    logger = logging.getLogger("isavar")
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)


def close_log_files() -> None:
    """Close and remove the file handlers of the ``isavar`` logger."""
    logger = logging.getLogger("isavar")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
