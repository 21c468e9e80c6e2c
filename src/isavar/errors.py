"""Exceptions for problems with the user's input; the CLI turns them into one-line errors."""

from __future__ import annotations


class InputError(Exception):
    """A problem with an input file, an option or an output location.

    The message is one line that names the file (when there is one) and the
    problem, e.g. ``"particles.star: column rlnDefocusU is missing (needed by --CTF)"``.
    """

    def __init__(self, message: str, *, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
