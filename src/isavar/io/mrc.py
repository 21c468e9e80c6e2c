"""MRC/MRCS stacks and volumes (MRC2014) through :mod:`mrcfile`.

Stacks are opened from their 1024-byte header (odd headers go through
``mrcfile.mmap``, which is permissive) and read with ``os.preadv`` (one file
descriptor per open stack, nothing left mapped); a file whose data block cannot
be read (truncated, not MRC, unsupported mode) raises
:class:`~isavar.errors.InputError`. Every real mode mrcfile maps
is accepted (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16); images are
converted to float32 on read. Complex modes are refused.

Writing streams chunks to disk (the header is completed at the end), sets the
image-stack flags (``ispg = 0``, ``mz = 1``) for stacks and the volume flags
(``ispg = 1``, ``mz = nz``) for volumes, and records the voxel size.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import mrcfile.utils as mrc_utils
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from isavar.errors import InputError
from isavar.io.stack import ImageSource, LazyImages, ParticleStack
from isavar.io.particles import new_table

_SUPPORTED_KINDS = ("i", "u", "f")


def _open_mmap(path):
    """Open ``path`` with mrcfile.mmap, turning warnings and unreadable data into InputError."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError("file not found", path=path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot read as MRC ({exc})", path=path) from None
    messages = [str(w.message) for w in caught]
    if mrc.data is None:
        mrc.close()
        detail = "; ".join(messages) or "no data block"
        if "Error opening memmap" in detail or "could only read" in detail:
            raise InputError(f"truncated or damaged MRC file ({detail})", path=path)
        raise InputError(f"not a readable MRC file ({detail})", path=path)
    if mrc.data.dtype.kind not in _SUPPORTED_KINDS:
        mode, dtype = int(mrc.header.mode), mrc.data.dtype
        mrc.close()
        raise InputError(f"MRC mode {mode} ({dtype}) is not a real-valued image mode", path=path)
    return mrc


def float32_value(value) -> float:
    """The shortest decimal that rounds to the same float32 (1.7f -> 1.7, not 1.7000000477)."""
    return float(str(np.float32(value)))


def _voxel_size(mrc) -> float | None:
    vs = float32_value(mrc.voxel_size.x)
    return vs if vs > 0 else None


class MrcSource(ImageSource):
    """Images of one MRC/MRCS stack (a single 2D image counts as a stack of one).

    Creating one reads the 1024-byte header and the file size only (about 50 µs a file, so the 5,000
    stacks of a RELION Extract job cost well under a second); files whose header is unusual (no map ID,
    an unknown machine stamp, a byte order that contradicts it, a size below the data block) go through
    mrcfile's permissive reader, which names the problem. An open source is one file descriptor: images
    are read with ``os.preadv``, runs of consecutive images in one call, so nothing stays mapped.
    """

    def __init__(self, path):
        info = _quick_header(path)
        if info is None:
            info = _mrcfile_header(path)
        shape = info["shape"]
        self.pixel_size_A = info["pixel_size_A"]
        self.mode = info["mode"]
        self.is_volume = info["is_volume"]
        self.dtype = info["dtype"]
        self.offset = info["offset"]
        if len(shape) == 2:
            shape = (1,) + shape
        if len(shape) != 3:
            raise InputError(f"expected an image stack, got data of shape {shape}", path=path)
        if shape[1] != shape[2]:
            raise InputError(f"images are not square ({shape[2]}x{shape[1]} pixels)", path=path)
        super().__init__(str(path), shape[0], shape[1])
        self.image_bytes = self.box * self.box * self.dtype.itemsize

    def open(self):
        try:
            return os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"cannot open ({exc.strerror})", path=self.path) from None

    def read(self, handle, indices):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self.read_into(handle, indices, np.empty((indices.size, self.box, self.box), dtype=self.dtype))

    def read_into(self, handle, indices, out):
        """Read images ``indices`` (sorted, unique) into ``out`` (``(k, box, box)`` of :attr:`dtype`, C order)."""
        if indices.size == 0:
            return out
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        stops = np.concatenate((breaks, [indices.size])).tolist()
        flat = out.reshape(indices.size, -1).view(np.uint8)
        for a, b in zip(starts, stops):
            _pread_exact(handle, memoryview(flat[a:b]).cast("B"), self.offset + int(indices[a]) * self.image_bytes,
                         self.path, int(indices[a]), int(indices[b - 1]))
        return out

    def close(self, handle):
        os.close(handle)


def sources_for_paths(paths) -> tuple[list[MrcSource], np.ndarray]:
    """One :class:`MrcSource` per distinct stack path (its header read once) and each path's source index.

    Parameters
    ----------
    paths : sequence of path-like
        Resolved stack paths, possibly repeated (several names of one file).

    Returns
    -------
    sources : list of MrcSource
        In order of first appearance.
    source_of_path : numpy.ndarray
        ``(len(paths),)`` int64 index into ``sources``.
    """
    sources, index_of, source_of_path = [], {}, np.empty(len(paths), dtype=np.int64)
    for k, p in enumerate(paths):
        if p not in index_of:
            index_of[p] = len(sources)
            sources.append(MrcSource(p))
        source_of_path[k] = index_of[p]
    return sources, source_of_path


def _pread_exact(fd: int, view: memoryview, offset: int, path: str, first: int, last: int) -> None:
    """Fill ``view`` from ``offset`` of the file; InputError naming the images when the file is short."""
    got = 0
    while got < view.nbytes:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[got:]], offset + got)
        else:                                                   # pragma: no cover - platforms without preadv
            data = os.pread(fd, view.nbytes - got, offset + got)
            n = len(data)
            view[got:got + n] = data
        if not n:
            raise InputError(f"truncated: images {first + 1}..{last + 1} cannot be read", path=path)
        got += n


def _quick_header(path) -> dict | None:
    """Stack geometry from the first 1024 bytes and the file size, or None when mrcfile must judge the file.

    Mirrors what ``mrcfile.mmap(permissive=True)`` finds for a well-formed file (byte order from the
    machine stamp, dtype from the mode, shape from nx/ny/nz/ispg/mz, data after the extended header).
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_DTYPE.itemsize)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    if len(raw) < HEADER_DTYPE.itemsize or raw[208:211] != b"MAP":
        return None
    try:
        order = mrc_utils.byte_order_from_machine_stamp(raw[212:214])
        header = np.frombuffer(raw, dtype=HEADER_DTYPE.newbyteorder(order))[0]
        mode = int(header["mode"])
        dtype = mrc_utils.dtype_from_mode(mode).newbyteorder(order)
    except (ValueError, KeyError):
        return None
    nx, ny, nz, mz, mx = (int(header[k]) for k in ("nx", "ny", "nz", "mz", "mx"))
    ispg, nsymbt = int(header["ispg"]), int(header["nsymbt"])
    if dtype.kind not in _SUPPORTED_KINDS or mx <= 0 or nsymbt < 0:
        return None
    if mrc_utils.spacegroup_is_volume_stack(ispg):
        return None                                              # 4D: mrcfile's reader says what it is
    shape = (ny, nx) if ispg == mrc_utils.IMAGE_STACK_SPACEGROUP and nz == 1 else (nz, ny, nx)
    if min(shape) <= 0:
        return None
    offset = HEADER_DTYPE.itemsize + nsymbt
    if size < offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        return None
    voxel = float32_value(np.float32(header["cella"]["x"] / header["mx"]))
    return {"shape": shape, "pixel_size_A": voxel if voxel > 0 else None, "mode": mode,
            "is_volume": ispg != mrc_utils.IMAGE_STACK_SPACEGROUP and len(shape) == 3 and shape[0] > 1,
            "dtype": dtype, "offset": offset}


def _mrcfile_header(path) -> dict:
    """The same fields through mrcfile's permissive reader (raises InputError for unreadable files)."""
    mrc = _open_mmap(path)
    try:
        data = mrc.data
        base = data
        while base is not None and not hasattr(base, "offset"):
            base = base.base
        offset = int(base.offset) if base is not None else HEADER_DTYPE.itemsize + int(mrc.header.nsymbt)
        return {"shape": tuple(data.shape), "pixel_size_A": _voxel_size(mrc), "mode": int(mrc.header.mode),
                "is_volume": bool(mrc.is_volume()) and data.ndim == 3 and data.shape[0] > 1,
                "dtype": data.dtype, "offset": offset}
    finally:
        mrc.close()


def read_mrc_header(path) -> dict:
    """Summary of an MRC header: shape, voxel size, mode and whether it is flagged as a volume.

    Parameters
    ----------
    path : path
        MRC/MRCS file.

    Returns
    -------
    dict
        ``shape`` (data shape), ``voxel_size_A`` (float or None), ``mode`` (int),
        ``is_volume`` (bool: ``ispg`` 1-230 and 3D data).
    """
    mrc = _open_mmap(path)
    try:
        return {"shape": tuple(mrc.data.shape), "voxel_size_A": _voxel_size(mrc), "mode": int(mrc.header.mode),
                "is_volume": bool(mrc.is_volume()) and mrc.data.ndim == 3}
    finally:
        mrc.close()


def read_mrc_stack(path) -> ParticleStack:
    """Read a bare MRC/MRCS stack as a particle stack.

    Parameters
    ----------
    path : path
        ``.mrcs`` or ``.mrc`` file of ``n`` square images.

    Returns
    -------
    ParticleStack
        Table with only ``image_path`` (absolute), ``image_index`` and, when
        the header has a voxel size, ``pixel_size_A``.
    """
    if Path(path).suffix.lower() != ".mrcs":
        header = read_mrc_header(path)
        if header["is_volume"]:
            raise InputError(f"is a 3D volume ({' x '.join(map(str, header['shape']))}, flagged as a volume in "
                             "its header), not a stack of particle images; a stack is an .mrcs file (or an "
                             ".mrc with image-stack header flags, ispg = 0)", path=path)
    src = MrcSource(path)
    table = new_table(src.n, image_path=str(Path(path).resolve()), pixel_size_A=src.pixel_size_A)
    images = LazyImages([src], np.zeros(src.n, np.int64), np.arange(src.n))
    return ParticleStack(table=table, images=images, pixel_size_A=src.pixel_size_A, path=str(path))


def read_mrc_volume(path) -> tuple[np.ndarray, float | None]:
    """Read a 3D map.

    Parameters
    ----------
    path : path
        ``.mrc``/``.map`` file.

    Returns
    -------
    volume : numpy.ndarray
        ``(nz, ny, nx)`` float32 (a copy in memory).
    voxel_size_A : float or None
    """
    mrc = _open_mmap(path)
    try:
        if mrc.data.ndim != 3:
            raise InputError(f"expected a 3D volume, got data of shape {mrc.data.shape}", path=path)
        volume = np.array(mrc.data, dtype=np.float32)
        voxel = _voxel_size(mrc)
    finally:
        mrc.close()
    if not np.isfinite(volume).all():
        raise InputError("volume contains NaN or Inf voxels", path=path)
    return volume, voxel


def check_writable(path, overwrite: bool) -> Path:
    """Refuse to replace an existing file unless ``overwrite``; make the parent folder.

    Parameters
    ----------
    path : path
        Output file.
    overwrite : bool
        Allow replacing an existing file.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError("already exists (use overwrite/--force to replace it)", path=path)
    if path.exists() and path.is_dir():
        raise InputError("is a directory", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_mrc_stack(path, chunks, pixel_size_A: float | None, *, overwrite: bool = False) -> int:
    """Stream image chunks into an MRCS stack (mode 2, float32; image-stack header flags).

    Parameters
    ----------
    path : path
        Output ``.mrcs``.
    chunks : iterable of numpy.ndarray
        ``(k, N, N)`` (or ``(N, N)``) image blocks, written in order.
    pixel_size_A : float or None
        Pixel size stored as the voxel size (0 when None).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    int
        Number of images written.

    Notes
    -----
    Data go to a temporary file beside ``path`` that is renamed over it at the
    end, so a failure never leaves a half-written stack under the target name.
    The header statistics (min, max, mean, rms) are accumulated per chunk.
    """
    path = check_writable(path, overwrite)
    tmp = _temp_name(path)
    n, box = 0, None
    dmin, dmax, total, total_sq = np.inf, -np.inf, 0.0, 0.0
    try:
        with open(tmp, "wb") as fh:
            fh.write(b"\0" * HEADER_DTYPE.itemsize)
            for chunk in chunks:
                chunk = np.asarray(chunk, dtype=np.float32)
                if chunk.ndim == 2:
                    chunk = chunk[None]
                if chunk.ndim != 3 or chunk.shape[1] != chunk.shape[2]:
                    raise InputError(f"images must be square (k, N, N) blocks, got shape {chunk.shape}", path=path)
                if box is None:
                    box = chunk.shape[1]
                elif chunk.shape[1] != box:
                    raise InputError(f"mixed box sizes while writing ({box} and {chunk.shape[1]})", path=path)
                if chunk.size == 0:
                    continue
                if not np.isfinite(chunk).all():
                    raise InputError(f"image block starting at image {n + 1} has NaN or Inf pixels", path=path)
                dmin = min(dmin, float(chunk.min()))
                dmax = max(dmax, float(chunk.max()))
                for start in range(0, chunk.shape[0], 64):  # float64 sums in bounded temporaries
                    part = chunk[start:start + 64].astype(np.float64)
                    total += float(part.sum())
                    total_sq += float(np.square(part, out=part).sum())
                np.ascontiguousarray(chunk, dtype="<f4").tofile(fh)
                n += chunk.shape[0]
        if box is None:
            raise InputError("no images to write", path=path)
        _write_stack_header(tmp, n, box, pixel_size_A, dmin, dmax, total, total_sq)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def _label_without_time(header) -> None:
    """One header label naming isavar, instead of mrcfile's, which carries the time of writing.

    The same data then always give the same file.
    """
    from isavar import __version__

    header.label[:] = b""
    header.label[0] = f"Created by isavar {__version__}".encode("ascii")[:80]
    header.nlabl = 1


def _write_stack_header(tmp: Path, n: int, box: int, pixel_size_A, dmin, dmax, total, total_sq) -> None:
    """Write a complete MRC2014 image-stack header at the start of ``tmp``."""
    header_path = tmp.with_name(tmp.name + ".hdr")
    try:
        with mrcfile.new(header_path, overwrite=True) as mrc:
            mrc.set_data(np.zeros((1, box, box), dtype=np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_A) if pixel_size_A else 0.0
            _label_without_time(mrc.header)
            header = mrc.header.copy()
    finally:
        if header_path.exists():
            header_path.unlink()
    header = header.astype(HEADER_DTYPE.newbyteorder("<"))
    count = n * box * box
    mean = total / count
    header["nz"] = n
    header["mz"] = 1
    header["ispg"] = 0
    header["nsymbt"] = 0
    header["dmin"], header["dmax"], header["dmean"] = dmin, dmax, mean
    header["rms"] = np.sqrt(max(total_sq / count - mean * mean, 0.0))
    header["machst"] = np.frombuffer(bytes([0x44, 0x44, 0, 0]), dtype=np.uint8)
    with open(tmp, "r+b") as fh:
        fh.write(header.tobytes())


def write_mrc_volume(path, volume: np.ndarray, voxel_size_A: float | None, *, overwrite: bool = False) -> None:
    """Write a 3D map (mode 2, volume header flags ``ispg = 1``, ``mz = nz``).

    Parameters
    ----------
    path : path
        Output ``.mrc``.
    volume : numpy.ndarray
        ``(nz, ny, nx)`` array.
    voxel_size_A : float or None
        Voxel size in Å.
    overwrite : bool
        Replace an existing file.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise InputError("volume to write contains NaN or Inf voxels", path=path)
    path = check_writable(path, overwrite)
    tmp = _temp_name(path)
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.set_volume()
            mrc.voxel_size = float(voxel_size_A) if voxel_size_A else 0.0
            mrc.update_header_stats()
            _label_without_time(mrc.header)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
