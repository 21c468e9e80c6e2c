"""The working stack as the ISAC stages read it: memory-mapped on disk, each task reading only its own rows.

The working stack (CTF-corrected, shrunken, centred images; ``stack_ali2d.npy`` in the output directory)
is the one array of ISAC2 whose size is ``N x T x T``. A workflow keeps it on disk and hands the stages a
:class:`MappedStack`, which pickles as its path: a task sent to a pool worker or built on an MPI rank
carries row indices (:class:`LazyRows`), and the process that runs it maps the file and reads those rows
alone. The in-memory API (:func:`isavar.isac.run.isac2`) passes plain arrays instead; the stages then
slice them as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


def normalise_for_alignment(images, mask) -> np.ndarray:
    """Subtract the mean inside the mask from every image (spec §5.2, images).

    Each image's mean depends on that image alone (the same bits whatever other images are in the batch).
    """
    inside = mask > 0.5
    means = images[:, inside].mean(axis=1, dtype=np.float64).astype(np.float32)
    return images - means[:, None, None]


class MappedStack:
    """A read-only ``(N, T, T)`` float32 stack in a ``.npy`` file, mapped on first use in each process.

    Pickles as its path (a few bytes), so tasks that name rows of it can be sent anywhere that sees the
    file (a pool worker, an MPI rank on a shared file system).

    Parameters
    ----------
    path : path-like
        A ``.npy`` file of shape ``(N, T, T)``.
    """

    def __init__(self, path):
        self.path = str(path)
        self._array = None

    def _map(self) -> np.ndarray:
        if self._array is None:
            self._array = _mapped(self.path)
        return self._array

    @property
    def shape(self) -> tuple:
        return self._map().shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        """Rows ``index`` read into memory (float32 copy)."""
        return np.array(self._map()[index], dtype=np.float32)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._array = None


#: The files this process has mapped, ``{path: ((inode, size, mtime), array)}``, at most :data:`MAPPED_FILES`.
_MAPPED: dict = {}
MAPPED_FILES = 4


def _mapped(path: str) -> np.ndarray:
    """``np.load(path, mmap_mode="r")``, reused by later tasks in this process while the file is unchanged.

    A task's :class:`MappedStack` arrives as a path, and a fresh mapping per task would fault every page it
    reads into the process again (a 2,000-particle run's workers took some 300,000 such faults, several
    seconds of system time); the mapping kept here serves the next tasks from pages already mapped.
    """
    st = os.stat(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    entry = _MAPPED.get(path)
    if entry is not None and entry[0] == key:
        return entry[1]
    array = np.load(path, mmap_mode="r")
    _MAPPED.pop(path, None)
    while len(_MAPPED) >= MAPPED_FILES:
        _MAPPED.pop(next(iter(_MAPPED)))
    _MAPPED[path] = (key, array)
    return array


def subtract_outside_mean(images, outside) -> np.ndarray:
    """Subtract from every image its mean over the pixels ``outside`` (float32, per image; the pre-alignment)."""
    return images - images[:, outside].mean(axis=1)[:, None, None].astype(np.float32)


@dataclass(frozen=True)
class LazyRows:
    """Rows of a :class:`MappedStack`, read (and normalised) only where they are used.

    ``np.asarray(rows)`` reads them; ``radius`` set: the mean inside that circle is subtracted
    (:func:`normalise_for_alignment`); ``outside`` set (a boolean mask): the mean over it is subtracted
    (:func:`subtract_outside_mean`).
    """

    source: MappedStack
    rows: np.ndarray
    radius: float | None = None
    outside: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __array__(self, dtype=None, copy=None):
        images = self.source[self.rows]
        if self.radius is not None:
            from isavar.isac._ops import circle

            images = normalise_for_alignment(images, circle(images.shape[-1], self.radius))
        if self.outside is not None:
            images = subtract_outside_mean(images, self.outside)
        return images if dtype is None else images.astype(dtype, copy=False)


class OutsideCentred:
    """A :class:`MappedStack` seen with every image's mean over ``outside`` subtracted, read on demand.

    ``view[a:b]`` is a :class:`LazyRows` (what a task carries); ``view[index_array]`` reads those images.
    """

    def __init__(self, source: MappedStack, outside):
        self.source = source
        self.outside = np.asarray(outside, bool)

    @property
    def shape(self) -> tuple:
        return self.source.shape

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyRows(self.source, np.arange(len(self))[index], outside=self.outside)
        return resolve(LazyRows(self.source, np.asarray(index, np.int64), outside=self.outside))


def centred_outside(images, outside):
    """``images`` with every image's mean over ``outside`` subtracted: at once for an array, on demand
    (:class:`OutsideCentred`) for a :class:`MappedStack`."""
    if isinstance(images, MappedStack):
        return OutsideCentred(images, outside)
    return subtract_outside_mean(images, outside)


def resolve(images) -> np.ndarray:
    """The pixels of a task's images: a :class:`LazyRows` is read here, an array passes through."""
    return np.asarray(images, dtype=np.float32)


class SubsetImages:
    """The alignment-normalised images of one generation's subset of the working stack.

    Parameters
    ----------
    working : MappedStack or ndarray, (N, T, T)
        The working stack.
    subset : ndarray of int, (n,), optional
        Rows of the subset (default: all).
    radius : float, optional
        The mean inside this circle is subtracted from every image (ISAC's ``target_radius``); None: the
        images are used as they are (already normalised).
    """

    def __init__(self, working, subset=None, radius=None):
        self.working = working
        self.subset = np.arange(len(working)) if subset is None else np.asarray(subset, np.int64)
        self.radius = radius
        self.mapped = isinstance(working, MappedStack)

    @property
    def shape(self) -> tuple:
        return (len(self.subset),) + tuple(self.working.shape[1:])

    def __len__(self) -> int:
        return len(self.subset)

    def take(self, local) -> np.ndarray:
        """Images ``local`` (positions in the subset) in memory, normalised."""
        local = np.asarray(local, np.int64)
        if self.mapped:
            return resolve(LazyRows(self.working, self.subset[local], self.radius))
        images = np.asarray(self.working[self.subset[local]], dtype=np.float32)
        if self.radius is None:
            return images
        from isavar.isac._ops import circle

        return normalise_for_alignment(images, circle(images.shape[-1], self.radius))

    def for_task(self, local):
        """What a task carries for images ``local``: row numbers when mapped, else the images themselves."""
        if self.mapped:
            return LazyRows(self.working, self.subset[np.asarray(local, np.int64)], self.radius)
        return self.take(local)


def as_subset(images) -> SubsetImages:
    """``images`` as a :class:`SubsetImages` (an array is taken as already normalised)."""
    if isinstance(images, SubsetImages):
        return images
    return SubsetImages(np.asarray(images, dtype=np.float32))


class PickRows:
    """Rows ``rows`` (any order) of an image source (e.g. a particle file), read where the task runs.

    Under MPI or serially the task is never pickled and the rows are read by the process that uses them.
    Sent to a pool worker, it travels as the names of the files and positions of its images
    (:meth:`isavar.io.stack.LazyImages.file_subset`) and the worker reads them; images held in memory travel
    as pixels.
    """

    def __init__(self, images, rows):
        self.images, self.rows = images, np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __array__(self, dtype=None, copy=None):
        block = np.asarray(self.images[self.rows], dtype=np.float32)
        return block if dtype is None else block.astype(dtype, copy=False)

    def __reduce__(self):
        file_subset = getattr(self.images, "file_subset", None)
        files = file_subset(self.rows) if file_subset is not None else None
        if files is not None:
            return (PickRows, (files, np.arange(len(self.rows))))
        return (np.asarray, (np.asarray(self, dtype=np.float32),))
