"""Progress reporting as a callback protocol; the CLI passes a tqdm adapter, libraries a null one."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """What algorithms call to report progress."""

    def stage(self, name: str, total: int | None = None) -> None:
        """Start a named stage with an optional number of steps."""

    def advance(self, n: int = 1) -> None:
        """Advance the current stage by ``n`` steps."""

    def close(self) -> None:
        """Finish the current stage."""


class NullProgress:
    """Progress that reports nothing (the library default)."""

    def stage(self, name: str, total: int | None = None) -> None:  # noqa: D102
        pass

    def advance(self, n: int = 1) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass


class TqdmProgress:
    """Progress shown as one tqdm bar per stage (used by the CLI on the root process).

    Parameters
    ----------
    disable : bool
        Show nothing (``--quiet`` or a non-root rank).
    """

    def __init__(self, *, disable: bool = False):
        self._disable = disable
        self._bar = None

    def stage(self, name: str, total: int | None = None) -> None:
        """Close the previous bar and open a new one."""
        from tqdm.auto import tqdm

        self.close()
        self._bar = tqdm(total=total, desc=name, disable=self._disable, leave=False, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        """Advance the open bar."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Close the open bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
