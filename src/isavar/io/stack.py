"""Lazy, memory-bounded access to particle images spread over one or many stack files.

:class:`LazyImages` presents the images of a particle table as one virtual
``(n, ny, nx)`` float32 stack, in the table's row order. Pixels are read only
when indexed (MRC stacks with ``os.preadv``, HDF datasets through h5py),
so a million-particle data set costs no more memory than the chunk being
processed. Every read is checked for NaN/Inf.

:class:`ParticleStack` bundles the table, the images and the pixel size, as
returned by :func:`isavar.io.read_particles`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from isavar.errors import InputError

#: Default number of images per chunk when iterating (128x128 float32: 64 KiB per image).
DEFAULT_CHUNK_SIZE = 1024

#: Open stack files kept at once (least recently used are closed first).
MAX_OPEN_FILES = 64


class ImageSource:
    """One file (or array) holding images; subclasses implement :meth:`open` and :meth:`read`.

    Attributes
    ----------
    path : str
        File name used in error messages.
    n : int
        Number of images.
    box : int
        Image edge length in pixels.
    """

    def __init__(self, path: str, n: int, box: int):
        self.path = str(path)
        self.n = int(n)
        self.box = int(box)

    def read(self, handle, indices: np.ndarray) -> np.ndarray:
        """Read images ``indices`` (sorted, unique, 0-based) as ``(k, box, box)`` of the stored dtype."""
        raise NotImplementedError

    def open(self):
        """Open the file; returns a handle passed to :meth:`read` and :meth:`close`."""
        return None

    def close(self, handle) -> None:
        """Close a handle returned by :meth:`open`."""


class ArraySource(ImageSource):
    """Images already in memory, ``(n, ny, nx)``."""

    def __init__(self, array: np.ndarray, name: str = "<array>"):
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"images must be (n, ny, nx), got shape {array.shape}")
        if array.shape[1] != array.shape[2]:
            raise InputError(f"images are not square ({array.shape[2]}x{array.shape[1]})", path=name)
        super().__init__(name, array.shape[0], array.shape[1])
        self.array = array

    def read(self, handle, indices):
        return self.array[indices]


class LazyImages:
    """Images of a particle table, read on demand.

    Parameters
    ----------
    sources : list of ImageSource
        The files holding the images.
    source_ids : array_like of int
        ``(n,)`` source of each image, in row order.
    indices : array_like of int
        ``(n,)`` 0-based position of each image in its source.

    Notes
    -----
    ``images[i]`` returns ``(ny, nx)`` float32; ``images[array]`` and
    ``images[slice]`` return ``(k, ny, nx)`` float32; :meth:`chunks` iterates
    in bounded memory. The object pickles without its open file handles, so it
    can be sent to worker processes.
    """

    def __init__(self, sources, source_ids, indices):
        self._sources = list(sources)
        self._source_ids = np.asarray(source_ids, dtype=np.int64).reshape(-1)
        self._indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._source_ids.shape != self._indices.shape:
            raise ValueError("source_ids and indices must have the same length")
        boxes = {s.box for s in self._sources}
        if len(boxes) > 1:
            detail = ", ".join(f"{s.path}: {s.box}" for s in self._sources[:4])
            raise InputError(f"images have mixed box sizes ({detail})", path=self._sources[0].path)
        self._box = boxes.pop() if boxes else 0
        if self._indices.size:
            counts = np.array([s.n for s in self._sources], dtype=np.int64)
            bad = np.flatnonzero((self._indices >= counts[self._source_ids]) | (self._indices < 0))
            if bad.size:
                src = self._sources[int(self._source_ids[bad[0]])]
                raise InputError(f"image index {int(self._indices[bad[0]]) + 1} (1-based) is past the end of the "
                                 f"stack, which holds {src.n} images", path=src.path)
        self._handles: OrderedDict[int, object] = OrderedDict()

    @classmethod
    def from_array(cls, array: np.ndarray, name: str = "<array>") -> "LazyImages":
        """Wrap an in-memory ``(n, ny, nx)`` array."""
        src = ArraySource(array, name)
        return cls([src], np.zeros(src.n, np.int64), np.arange(src.n))

    # ----------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self._indices.size)

    @property
    def box(self) -> int:
        """Image edge length in pixels."""
        return self._box

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n, ny, nx)``."""
        return (len(self), self._box, self._box)

    @property
    def dtype(self) -> np.dtype:
        """Always float32 (stored data are converted on read)."""
        return np.dtype(np.float32)

    @property
    def sources(self) -> list[ImageSource]:
        """The files holding the images."""
        return list(self._sources)

    # --------------------------------------------------------------------- access
    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < -len(self) or i >= len(self):
                raise IndexError(f"image {i} out of range for {len(self)} images")
            return self._read_rows(np.array([i % len(self)]))[0]
        if isinstance(key, slice):
            rows = np.arange(len(self))[key]
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                if rows.shape != (len(self),):
                    raise IndexError("boolean mask must have one entry per image")
                rows = np.flatnonzero(rows)
            rows = rows.astype(np.int64).reshape(-1)
            if rows.size and (rows.max() >= len(self) or rows.min() < -len(self)):
                raise IndexError(f"image index out of range for {len(self)} images")
            rows = rows % max(len(self), 1)
        return self._read_rows(rows)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[tuple[int, int, np.ndarray]]:
        """Iterate over consecutive images in bounded memory.

        Each chunk is read file by file (files in the order of their paths), in the order of the images
        in each file (one read per run of consecutive images), whatever the row order; at most
        :data:`MAX_OPEN_FILES` files are open at once. For a table whose rows are not in file order,
        iterate ``images.subset(images.file_order())`` to read every file once, front to back.

        Parameters
        ----------
        chunk_size : int
            Images per chunk.

        Yields
        ------
        start, stop : int
            Row range of the chunk.
        images : numpy.ndarray
            ``(stop - start, ny, nx)`` float32.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        for start in range(0, len(self), chunk_size):
            stop = min(start + chunk_size, len(self))
            yield start, stop, self._read_rows(np.arange(start, stop))

    def subset(self, rows) -> "LazyImages":
        """A LazyImages of the given rows (no pixels are read)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return LazyImages(self._sources, self._source_ids[rows], self._indices[rows])

    def file_subset(self, rows) -> "LazyImages | None":
        """The rows as a LazyImages that names only the files they come from (no pixels are read).

        Cheap to pickle whatever the size of the table, so a task sent to another process can carry it and
        read its images there. None when one of those images is held in memory (an :class:`ArraySource`,
        which would travel whole).

        Parameters
        ----------
        rows : array_like of int
            Rows of this table, any order.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        used, local = np.unique(self._source_ids[rows], return_inverse=True)
        sources = [self._sources[int(i)] for i in used]
        if any(isinstance(src, ArraySource) for src in sources):
            return None
        return LazyImages(sources, local.reshape(-1), self._indices[rows])

    def file_order(self) -> np.ndarray:
        """Rows sorted by file, then by position in the file: the order in which the disk streams.

        Returns
        -------
        numpy.ndarray
            ``(n,)`` int64 permutation of the rows. ``images.subset(order).chunks()`` reads every file
            once, front to back, even when the table's order is shuffled (a chunk of a shuffled table
            touches hundreds of files).
        """
        return np.lexsort((self._indices, self._file_rank()[self._source_ids]))

    def _file_rank(self) -> np.ndarray:
        """Rank of each source's path in sorted order (files named in order usually lie in order on disk)."""
        rank = self.__dict__.get("_rank")
        if rank is None or rank.size != len(self._sources):
            paths = np.array([s.path for s in self._sources], dtype=object)
            rank = np.empty(len(paths), dtype=np.int64)
            rank[np.argsort(paths, kind="stable")] = np.arange(len(paths))
            self._rank = rank
        return rank

    def path_column(self):
        """The file of each image as a categorical column (one string per file, a small code per row).

        Returns
        -------
        pandas.Categorical
            ``(n,)`` with the sources' paths as categories (an object array if two sources share a path).
        """
        paths = [s.path for s in self._sources]
        if len(set(paths)) != len(paths):
            return np.array(paths, dtype=object)[self._source_ids]
        return pd.Categorical.from_codes(self._source_ids, categories=pd.Index(paths, dtype=object))

    def close(self) -> None:
        """Close every open file."""
        while self._handles:
            sid, handle = self._handles.popitem(last=False)
            self._sources[sid].close(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------- internal
    def _handle(self, sid: int):
        if sid in self._handles:
            self._handles.move_to_end(sid)
            return self._handles[sid]
        handle = self._sources[sid].open()
        self._handles[sid] = handle
        while len(self._handles) > MAX_OPEN_FILES:
            old, old_handle = self._handles.popitem(last=False)
            self._sources[old].close(old_handle)
        return handle

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((rows.size, self._box, self._box), dtype=np.float32)
        if rows.size == 0:
            return out
        sids = self._source_ids[rows]
        idx = self._indices[rows]
        if sids[0] == sids[-1] and (sids == sids[0]).all() and (idx.size == 1 or (np.diff(idx) == 1).all()):
            src = self._sources[int(sids[0])]
            if _reads_float32_into(src):
                src.read_into(self._handle(int(sids[0])), idx, out)
                block = out
            else:
                block = np.asarray(src.read(self._handle(int(sids[0])), idx), dtype=np.float32)
            _check_finite(block, src.path, idx)
            return block
        # Grouped by file and sorted by position in it, so that each file is read front to back once
        # (the disk streams); the rows come back in the order asked for.
        order = np.lexsort((idx, self._file_rank()[sids]))
        s_sorted, i_sorted = sids[order], idx[order]
        bounds = np.flatnonzero(s_sorted[1:] != s_sorted[:-1]) + 1
        for a, b in zip(np.concatenate(([0], bounds)).tolist(), np.concatenate((bounds, [rows.size])).tolist()):
            sid = int(s_sorted[a])
            src = self._sources[sid]
            wanted = i_sorted[a:b]
            first = np.concatenate(([True], wanted[1:] != wanted[:-1]))
            uniq = wanted[first]
            target = order[a:b]
            if uniq.size == wanted.size and target[-1] - target[0] == b - a - 1 and _reads_float32_into(src) \
                    and (np.diff(target) == 1).all():
                view = out[int(target[0]):int(target[-1]) + 1]    # rows of this file are a run: no copy
                src.read_into(self._handle(sid), uniq, view)
                _check_finite(view, src.path, uniq)
                continue
            block = np.asarray(src.read(self._handle(sid), uniq), dtype=np.float32)
            _check_finite(block, src.path, uniq)
            out[target] = block if uniq.size == wanted.size else block[np.cumsum(first) - 1]
        return out


def file_order_of(images) -> np.ndarray:
    """The rows of ``images`` in the order their files hold them (:meth:`LazyImages.file_order`).

    A pass over every image that takes its chunks of rows in this order reads each file once, front to back
    (the disk streams), even when the particle table is shuffled; the rows of a table already in file order
    come back as ``arange(n)``. Images not read from files (an array) are in row order.

    Parameters
    ----------
    images : LazyImages or array-like, (n, box, box)

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int64 permutation of the rows.
    """
    if isinstance(images, LazyImages):
        return images.file_order().astype(np.int64, copy=False)
    return np.arange(len(images), dtype=np.int64)


def _reads_float32_into(src) -> bool:
    """True for sources that can fill a float32 array in place (native float32 MRC stacks)."""
    return hasattr(src, "read_into") and getattr(src, "dtype", None) == np.dtype(np.float32)


def release_freed_memory() -> None:
    """Give the memory freed after parsing a large table back to the system (glibc ``malloc_trim``).

    Parsing a million-row STAR or .cs file frees several hundred MB of temporaries that glibc would
    otherwise keep in the process (RSS 670 MB instead of 320 MB after reading 1,000,000 particles).
    Does nothing where the C library has no ``malloc_trim``.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _check_finite(block: np.ndarray, path: str, indices: np.ndarray) -> None:
    """Raise InputError naming the first image with a NaN or Inf pixel."""
    # One fast reduction; NaN and Inf propagate into the sum (an overflow only triggers the exact check).
    if np.isfinite(np.sum(block, dtype=np.float32)) or np.isfinite(block).all():
        return
    bad = np.flatnonzero(~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1))
    raise InputError(f"image {int(indices[bad[0]]) + 1} (1-based) contains NaN or Inf pixels", path=path)


@dataclass
class ParticleStack:
    """A particle table with its images, as read from a file.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per particle, canonical columns (see :mod:`isavar.io.particles`) plus passthrough columns.
    images : LazyImages
        The images, in the table's row order.
    pixel_size_A : float or None
        Pixel size in Å (None when no file states it).
    path : str
        The file read.
    """

    table: pd.DataFrame
    images: LazyImages
    pixel_size_A: float | None
    path: str = ""

    def __len__(self) -> int:
        return len(self.table)

    def close(self) -> None:
        """Close the open stack files."""
        self.images.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
