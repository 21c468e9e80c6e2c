"""Particle and volume I/O: one API over RELION STAR+MRCS, bare MRCS, EMAN2/SPHIRE HDF and cryoSPARC .cs.

The format is chosen from the file suffix:

=================  =========================================  ==========================================
suffix             read_particles                             write_particles
=================  =========================================  ==========================================
``.star``          RELION 3.0 / 3.1+ (optics merged)          RELION 3.1 + ``<stem>.mrcs`` beside it
``.mrcs``/``.mrc`` bare stack (path, index, pixel size)       images only (metadata dropped)
``.hdf``/``.h5``   EMAN2/SPHIRE ``/MDF/images/<i>``           EMAN2/SPHIRE, header as ``EMAN.*`` attrs
``.cs``            cryoSPARC structured array                 cryoSPARC + ``<stem>.mrcs`` beside it
``bdb:DIR#name``   EMAN2/SPHIRE BDB stack, normal or virtual  (not written; use ``.hdf``)
``EMAN2DB/x.bdb``  (needs the ``bdb`` extra, see io.bdb)
=================  =========================================  ==========================================

Examples
--------
>>> stack = read_particles("particles.star")                      # doctest: +SKIP
>>> for start, stop, block in stack.images.chunks(1000):         # doctest: +SKIP
...     process(block)                                            # (1000, N, N) float32
>>> write_particles("out.hdf", stack.images, stack.table)         # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from isavar.errors import InputError
from isavar.io.stack import DEFAULT_CHUNK_SIZE, LazyImages, ParticleStack

__all__ = [
    "LazyImages",
    "ParticleStack",
    "particle_format",
    "read_particles",
    "write_particles",
    "read_volume",
    "write_volume",
    "write_image_stack",
    "iter_chunks",
]

_FORMATS = {".star": "star", ".mrcs": "mrcs", ".mrc": "mrcs", ".st": "mrcs", ".map": "mrcs",
            ".hdf": "hdf", ".hdf5": "hdf", ".h5": "hdf", ".cs": "cs"}



def particle_format(path) -> str:
    """Name the particle format of a path: ``star``, ``mrcs``, ``hdf``, ``cs`` or ``bdb``.

    ``bdb:...`` names and ``.../EMAN2DB/name.bdb`` paths are ``bdb`` (see :mod:`isavar.io.bdb`);
    other formats come from the suffix.

    Raises
    ------
    InputError
        For unknown suffixes.
    """
    text = str(path)
    from isavar.io.bdb import is_bdb_path

    if is_bdb_path(text):
        return "bdb"
    if "EMAN2DB" in Path(text).parts:
        raise InputError("a file inside an EMAN2DB directory: name the stack as bdb:DIR#name or "
                         "DIR/EMAN2DB/name.bdb", path=text)
    suffix = Path(text).suffix.lower()
    if suffix not in _FORMATS:
        raise InputError(f"unknown file format {suffix or '(no suffix)'!r}; expected one of "
                         f"{', '.join(sorted(_FORMATS))}", path=text)
    return _FORMATS[suffix]


def read_particles(path, *, project_dir=None, pixel_size_A: float | None = None) -> ParticleStack:
    """Read a particle file: table, lazily-read images and pixel size.

    Parameters
    ----------
    path : path
        ``.star``, ``.mrcs``/``.mrc``, ``.hdf``, ``.cs`` or an EMAN2/SPHIRE BDB stack
        (``bdb:DIR#name``, ``bdb:name``, ``DIR/EMAN2DB/name.bdb``).
    project_dir : path, optional
        RELION project directory against which relative ``rlnImageName`` paths
        of a STAR file are resolved first (default: the current directory, as
        RELION does; the STAR file's folder and its parents are the fallbacks).
    pixel_size_A : float, optional
        Pixel size (Å) to use instead of the file's (``--apix``): it fills
        ``pixel_size_A`` and converts origins a file gives only in pixels (a
        SPHIRE HDF without ``apix_x``).

    Returns
    -------
    ParticleStack
        ``.table`` (canonical + passthrough columns), ``.images`` (LazyImages in
        table order), ``.pixel_size_A`` (float or None).

    Raises
    ------
    InputError
        Missing file, unknown format, missing or truncated stack, index past the
        end of a stack, non-square or mixed box sizes; for BDB also a missing
        Berkeley DB binding (the ``bdb`` extra).
    """
    kind = particle_format(path)
    if kind == "bdb":
        from isavar.io.bdb import read_bdb

        stack = read_bdb(str(path))
    elif not Path(path).exists():
        raise InputError("file not found", path=path)
    elif kind == "star":
        from isavar.io.star import read_star

        stack = read_star(path, project_dir=project_dir)
    elif kind == "mrcs":
        from isavar.io.mrc import read_mrc_stack

        stack = read_mrc_stack(path)
    elif kind == "hdf":
        from isavar.io.eman_hdf import read_hdf

        stack = read_hdf(path)
    else:
        from isavar.io.cryosparc import read_cs

        stack = read_cs(path)
    if pixel_size_A is not None:
        from isavar.io.particles import set_pixel_size

        stack = set_pixel_size(stack, pixel_size_A)
    return stack


def iter_chunks(images, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Yield float32 ``(k, N, N)`` blocks from an array, a LazyImages or an iterable of blocks.

    Parameters
    ----------
    images : numpy.ndarray or LazyImages or iterable of numpy.ndarray
        The images.
    chunk_size : int
        Images per block for arrays and LazyImages.

    Yields
    ------
    numpy.ndarray
    """
    if isinstance(images, LazyImages):
        for _, _, block in images.chunks(chunk_size):
            yield block
    elif isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 2 else images
        for start in range(0, array.shape[0], chunk_size):
            yield np.asarray(array[start:start + chunk_size], dtype=np.float32)
    else:
        for block in images:
            yield np.asarray(block, dtype=np.float32)


def write_particles(path, images, table: pd.DataFrame, *, pixel_size_A: float | None = None,
                    overwrite: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE, project_dir=None) -> None:
    """Write particles in the format given by the suffix.

    Parameters
    ----------
    path : path
        ``.star`` (writes ``<stem>.mrcs`` beside it), ``.mrcs`` (images only),
        ``.hdf``, ``.cs`` (writes ``<stem>.mrcs`` beside it).
    images : numpy.ndarray or LazyImages or iterable of numpy.ndarray
        ``(n, N, N)`` images in table order, or blocks of them.
    table : pandas.DataFrame
        One row per image; ``image_path``/``image_index`` are ignored (the new
        files define them).
    pixel_size_A : float, optional
        Pixel size where the table has none.
    overwrite : bool
        Replace existing outputs (never the default).
    chunk_size : int
        Images per block when streaming.
    project_dir : path, optional
        STAR output only: name the stack in ``rlnImageName`` relative to this
        RELION project directory (RELION run from there opens it), or by its
        absolute path when it lies outside. Default: relative to the STAR
        file's folder (the pair can be moved together).

    Raises
    ------
    InputError
        Output exists without ``overwrite``, unknown format, unknown pixel size
        where the format needs it.
    """
    kind = particle_format(path)
    if kind == "bdb":
        raise InputError("isavar does not write BDB databases (EMAN2 removed them in 2022); write .hdf, "
                         "which EMAN2 and SPHIRE read", path=path)
    if isinstance(images, (np.ndarray, LazyImages)) and len(images) != len(table):
        raise ValueError(f"{len(images)} images but the table has {len(table)} rows")
    chunks = iter_chunks(images, chunk_size)
    if kind == "star":
        from isavar.io.star import write_star

        write_star(path, chunks, table, pixel_size_A=pixel_size_A, overwrite=overwrite, project_dir=project_dir)
    elif kind == "mrcs":
        from isavar.io.mrc import write_mrc_stack

        if pixel_size_A is None and "pixel_size_A" in table.columns and not table["pixel_size_A"].isna().all():
            pixel_size_A = float(table["pixel_size_A"].dropna().iloc[0])
        n = write_mrc_stack(path, chunks, pixel_size_A, overwrite=overwrite)
        if n != len(table):
            raise ValueError(f"{n} images written but the table has {len(table)} rows")
    elif kind == "hdf":
        from isavar.io.eman_hdf import write_hdf

        write_hdf(path, chunks, table, pixel_size_A=pixel_size_A, overwrite=overwrite)
    else:
        from isavar.io.cryosparc import write_cs

        write_cs(path, chunks, table, pixel_size_A=pixel_size_A, overwrite=overwrite)


def write_image_stack(path, images, pixel_size_A: float | None, *, overwrite: bool = False) -> int:
    """Write a plain MRCS image stack (image-stack header flags ``ispg = 0``, ``mz = 1``).

    Parameters
    ----------
    path : path
        Output ``.mrcs``.
    images : numpy.ndarray or LazyImages or iterable of numpy.ndarray
        ``(n, N, N)`` images or blocks of them.
    pixel_size_A : float or None
        Pixel size in Å.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    int
        Number of images written.
    """
    from isavar.io.mrc import write_mrc_stack

    return write_mrc_stack(path, iter_chunks(images), pixel_size_A, overwrite=overwrite)


def read_volume(path) -> tuple[np.ndarray, float | None]:
    """Read a 3D map from ``.mrc``/``.map`` or EMAN2 ``.hdf`` (image 0).

    Returns
    -------
    volume : numpy.ndarray
        ``(nz, ny, nx)`` float32.
    voxel_size_A : float or None
    """
    kind = particle_format(path)
    if kind == "bdb":
        raise InputError("reading volumes from BDB is not supported; export it with "
                         "`e2proc2d.py bdb:DIR#name volume.hdf`", path=path)
    if not Path(path).exists():
        raise InputError("file not found", path=path)
    if kind == "mrcs":
        from isavar.io.mrc import read_mrc_volume

        return read_mrc_volume(path)
    if kind == "hdf":
        from isavar.io.eman_hdf import read_hdf_volume

        return read_hdf_volume(path)
    raise InputError(f"{kind} files hold particles, not volumes", path=path)


def write_volume(path, volume: np.ndarray, voxel_size_A: float | None, *, overwrite: bool = False) -> None:
    """Write a 3D map as ``.mrc`` (volume header flags) or EMAN2 ``.hdf``.

    Parameters
    ----------
    path : path
        Output file.
    volume : numpy.ndarray
        ``(nz, ny, nx)``.
    voxel_size_A : float or None
        Voxel size in Å.
    overwrite : bool
        Replace an existing file.
    """
    kind = particle_format(path)
    if kind == "mrcs":
        from isavar.io.mrc import write_mrc_volume

        write_mrc_volume(path, volume, voxel_size_A, overwrite=overwrite)
    elif kind == "hdf":
        from isavar.io.eman_hdf import write_hdf_volume

        write_hdf_volume(path, volume, voxel_size_A, overwrite=overwrite)
    else:
        raise InputError(f"cannot write a volume as {kind}; use .mrc or .hdf", path=path)
