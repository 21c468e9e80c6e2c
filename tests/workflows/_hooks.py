"""Interrupting a workflow at a chosen checkpoint through its ``on_checkpoint`` hook."""

from __future__ import annotations


class StopForTest(RuntimeError):
    """Raised by :func:`stop_after` to interrupt a run as a kill or Ctrl-C would, after a checkpoint."""


def stop_after(n: int):
    """An ``on_checkpoint`` hook raising :class:`StopForTest` once ``n`` checkpoints are saved."""

    def hook(count: int) -> None:
        if count >= n:
            raise StopForTest(f"stopped after {count} checkpoints")

    return hook
