"""Memory-allocator settings for the processes of the command line (glibc's ``mallopt``; elsewhere nothing).

NumPy takes its arrays from ``malloc``. glibc serves a request above a moving threshold (128 kB at start,
raised up to 32 MB as such blocks are freed) with a fresh ``mmap`` and gives freed memory at the top of the
heap back to the system once more than twice that threshold is free. Each page of new memory then costs
a page fault when it is first written, and the alignment passes allocate and free arrays of a few MB
thousands of times. On the 2-core benchmark machine (a virtual machine, about 10 µs per fault) a
2,000-particle ISAC2 run took 420,000 page faults and 4.5 s of system time in one process; with the
settings below, 85,000 and 2.3 s (``bench/isac2.md``). The price is memory kept for reuse: up to
``trim_threshold`` bytes of freed heap per process stay mapped instead of going back to the system.

``ISAVAR_DEFAULT_MALLOC=1`` in the environment leaves glibc's defaults, as do glibc's own ``MALLOC_*_``
variables for the settings they name (an explicit choice wins).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator"]

#: ``mallopt`` parameter numbers (glibc ``malloc.h``)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

#: glibc's upper limit for the mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)
MMAP_THRESHOLD_MAX = 32 << 20


def tune_allocator(*, mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 512 << 20,
                   top_pad: int = 64 << 20) -> bool:
    """Keep freed memory in the process for reuse instead of mapping fresh pages again.

    Parameters
    ----------
    mmap_threshold : int
        Requests of at least this many bytes get their own mapping (at most 32 MiB).
    trim_threshold : int
        Free bytes at the top of the heap above which glibc returns memory to the system.
    top_pad : int
        Extra bytes requested from the system whenever the heap grows.

    Returns
    -------
    bool
        Whether the settings were applied (False off glibc, or when the environment asks for the defaults).
    """
    if os.environ.get("ISAVAR_DEFAULT_MALLOC") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", min(int(mmap_threshold), MMAP_THRESHOLD_MAX)),
                (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", int(trim_threshold)),
                (M_TOP_PAD, "MALLOC_TOP_PAD_", int(top_pad)))
    applied = True
    for option, variable, value in settings:
        if variable not in os.environ:
            applied = (mallopt(option, value) == 1) and applied
    return applied
