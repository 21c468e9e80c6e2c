"""EMAN2/SPHIRE HDF5 image files through :mod:`h5py`, without EMAN2.

Layout (as EMAN2's ``libEM/io/hdfio2.cpp`` reads and writes it)
-----------------------------------------------------------------
* image *i* is the dataset ``/MDF/images/<i>/image``: float32, contiguous,
  shape ``(ny, nx)`` (``(nz, ny, nx)`` for a volume);
* the group ``/MDF/images`` has the int32 attribute ``imageid_max`` (highest
  image number, ``n - 1``);
* the header of image *i* is the set of attributes ``EMAN.<key>`` on the group
  ``/MDF/images/<i>``: int -> int32 and float -> float32 one-element arrays,
  bool -> one signed char ``'T'``/``'F'``, string -> a scalar null-terminated
  C string, int/float lists -> 1-D int32/float32 arrays, ``Transform`` -> one
  HDF5 compound of 12 float32 fields ``"00"`` ... ``"23"`` (the row-major 3x4
  matrix). EMAN2 takes ``nx``, ``ny``, ``nz`` from the header, so they are
  always written.

Header keys and particle-table columns
--------------------------------------
=========================  ============================================================
EMAN key                   columns
=========================  ============================================================
``ctf`` (EMAN2Ctf string)  defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV,
                           cs_mm, amplitude_contrast, ctf_bfactor_A2
``xform.projection``       angle_rot/tilt/psi_deg and origin_x/y_A: matrix ``[A | t]``,
                           ``t = (-origin_x_px, -origin_y_px, 0)`` (SPHIRE's
                           ``set_params_proj`` stores ``-s2x``, and ``s2x`` is
                           RELION's origin; see conventions)
``xform.align2d``          align_alpha_deg, align_sx_px, align_sy_px, align_mirror:
                           matrix ``M**m [R(alpha) | (sx, sy)]``, mirror from the sign
                           of the determinant
``apix_x``                 pixel_size_A
``ptcl_source_image``      micrograph_name
``ptcl_source_coord``      coordinate_x_px, coordinate_y_px
``segment_angle``          segment_angle_deg
anything else              a column of the same name (``members``, ``n_objects``,
                           ``ISAC_class_id``, ``class_number``, ``true_*`` ...)
=========================  ============================================================
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from isavar.conventions import (
    ampcont_fraction_to_percent,
    ampcont_percent_to_fraction,
    eman_to_relion_defocus,
    euler_to_matrix,
    format_eman2_ctf,
    matrix_to_euler,
    origin_to_sphire_trans,
    parse_eman2_ctf,
    relion_to_eman_defocus,
    sphire_trans_to_origin,
)
from isavar.errors import InputError
from isavar.io.mrc import check_writable
from isavar.io.particles import ALIGN2D_COLUMNS, CTF_COLUMNS, EMAN_KEYS, ORIENTATION_COLUMNS, coerce_dtypes
from isavar.io.stack import ImageSource, LazyImages, ParticleStack

log = logging.getLogger(__name__)

#: Header keys EMAN2 derives from the data (not turned into columns).
_INTERNAL_KEYS = {
    "nx", "ny", "nz", "datatype", "is_complex", "is_complex_x", "is_complex_ri", "changecount", "minimum",
    "maximum", "mean", "sigma", "square_sum", "mean_nonzero", "sigma_nonzero", "apix_y", "apix_z",
    "stored_rendermin", "stored_rendermax", "stored_renderbits", "stored_truncated", "render_min",
    "render_max", "render_bits", "source_path", "source_n", "HDF5.version", "origin_x", "origin_y", "origin_z",
}
#: Header keys turned into canonical columns.
_MAPPED_KEYS = {"ctf", "xform.projection", "xform.align2d", "ptcl_source_coord", *EMAN_KEYS.values()}
_TRANSFORM_DTYPE = np.dtype([(f"{r}{c}", "<f4") for r in range(3) for c in range(4)])


# --------------------------------------------------------------------------------------
# Attribute encoding
# --------------------------------------------------------------------------------------


def _simple_space():
    return h5py.h5s.create_simple((1,))


_TYPES = {
    "int8": h5py.h5t.py_create(np.dtype(np.int8)),
    "int32": h5py.h5t.py_create(np.dtype(np.int32)),
    "float32": h5py.h5t.py_create(np.dtype(np.float32)),
    "float64": h5py.h5t.py_create(np.dtype(np.float64)),
    "transform": h5py.h5t.py_create(_TRANSFORM_DTYPE),
}


def _create_attr(obj, name: str, data: np.ndarray, tid, space) -> None:
    """Create (or replace) one attribute with h5py's low-level API (about twice as fast as ``attrs.create``)."""
    bname = name.encode("utf-8")
    if h5py.h5a.exists(obj.id, bname):
        h5py.h5a.delete(obj.id, bname)
    attr = h5py.h5a.create(obj.id, bname, tid, space)
    attr.write(np.ascontiguousarray(data))


def _write_string_attr(obj, name: str, text: str) -> None:
    data = text.encode("utf-8")
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(data) + 1)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    _create_attr(obj, name, np.array(data + b"\0", dtype=f"S{len(data) + 1}"), tid,
                 h5py.h5s.create(h5py.h5s.SCALAR))


def write_eman_attr(obj, key: str, value) -> None:
    """Write one header value as EMAN2 does (see the module notes for the types).

    Parameters
    ----------
    obj : h5py.Group
        The image group (``/MDF/images/<i>``).
    key : str
        Header key; the attribute is ``"EMAN." + key``.
    value : bool, int, float, numpy.float64, str, sequence or :func:`transform_value`
        The value. Python floats are stored as float32 (as EMAN2 does);
        ``numpy.float64`` as a double (EMAN2 reads scalar doubles), which
        passthrough columns use to stay lossless.
    """
    name = "EMAN." + key
    if isinstance(value, _Transform):
        data = np.array([tuple(value.matrix.reshape(-1))], dtype=_TRANSFORM_DTYPE)
        _create_attr(obj, name, data, _TYPES["transform"], _simple_space())
    elif isinstance(value, (bool, np.bool_)):
        _create_attr(obj, name, np.array([ord("T") if value else ord("F")], np.int8), _TYPES["int8"],
                     _simple_space())
    elif isinstance(value, (int, np.integer)):
        _create_attr(obj, name, np.array([value], np.int32), _TYPES["int32"], _simple_space())
    elif isinstance(value, np.float64):
        _create_attr(obj, name, np.array([value], np.float64), _TYPES["float64"], _simple_space())
    elif isinstance(value, (float, np.floating)):
        _create_attr(obj, name, np.array([value], np.float32), _TYPES["float32"], _simple_space())
    elif isinstance(value, str):
        _write_string_attr(obj, name, value)
    else:
        array = np.asarray(value).reshape(-1)
        if array.dtype.kind in "iub":
            _create_attr(obj, name, array.astype(np.int32), _TYPES["int32"], h5py.h5s.create_simple(array.shape))
        elif array.dtype.kind == "f":
            _create_attr(obj, name, array.astype(np.float32), _TYPES["float32"],
                         h5py.h5s.create_simple(array.shape))
        else:
            raise ValueError(f"cannot store {key}={value!r} as an EMAN2 header value")


_DTYPE_CACHE: dict = {}


def _type_key(tid):
    """A hashable description of an HDF5 attribute type (to reuse its numpy dtype)."""
    cls = tid.get_class()
    if cls == h5py.h5t.INTEGER:
        return (cls, tid.get_size(), tid.get_sign(), tid.get_order())
    if cls == h5py.h5t.FLOAT:
        return (cls, tid.get_size(), tid.get_order())
    if cls == h5py.h5t.STRING:
        return (cls, tid.get_size(), tid.is_variable_str(), tid.get_cset())
    if cls == h5py.h5t.COMPOUND:
        names = tuple(tid.get_member_name(i) for i in range(tid.get_nmembers()))
        offsets = tuple(tid.get_member_offset(i) for i in range(tid.get_nmembers()))
        return (cls, tid.get_size(), names, offsets)
    return None


def read_group_attrs(group) -> dict:
    """Read every ``EMAN.*`` attribute of a group with h5py's low-level API, keys without the prefix.

    Parameters
    ----------
    group : h5py.Group or h5py.h5g.GroupID
        The image group.

    Returns
    -------
    dict
        Raw numpy arrays (decode them with :func:`read_eman_attr`).
    """
    gid = group.id if isinstance(group, h5py.Group) else group
    names: list[bytes] = []
    h5py.h5a.iterate(gid, lambda name, *_: names.append(name))
    out = {}
    for bname in names:
        if not bname.startswith(b"EMAN."):
            continue
        attr = h5py.h5a.open(gid, bname)
        key = _type_key(attr.get_type())
        dtype = _DTYPE_CACHE.get(key) if key is not None else None
        if dtype is None:
            dtype = attr.dtype
            if key is not None:
                _DTYPE_CACHE[key] = dtype
        try:
            data = np.empty(attr.shape, dtype=dtype)
            attr.read(data)
        except (TypeError, ValueError, OSError):  # e.g. variable-length strings: the high-level reader
            data = h5py.AttributeManager(h5py.Group(gid))[bname.decode("utf-8", errors="replace")]
        out[bname[5:].decode("utf-8", errors="replace")] = data
    return out


class _Transform:
    """A 3x4 matrix to store as an EMAN2 Transform."""

    def __init__(self, matrix):
        self.matrix = np.asarray(matrix, dtype=np.float32).reshape(3, 4)


def transform_value(matrix) -> _Transform:
    """Mark a ``(3, 4)`` matrix to be written as an EMAN2 ``Transform`` compound."""
    return _Transform(matrix)


def read_eman_attr(attr_value):
    """Decode one EMAN2 header attribute read with h5py.

    Returns
    -------
    bool, int, float, str, numpy.ndarray (1-D) or numpy.ndarray (3, 4) for a Transform.
    """
    value = attr_value
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace").rstrip("\0")
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.dtype.names is not None:
        names = [f"{r}{c}" for r in range(3) for c in range(4)]
        if all(n in array.dtype.names for n in names):
            row = array.reshape(-1)[0]
            return np.array([float(row[n]) for n in names], dtype=np.float64).reshape(3, 4)
        return None
    if array.dtype.kind in "SO":
        item = array.reshape(-1)[0]
        return item.decode("utf-8", errors="replace").rstrip("\0") if isinstance(item, bytes) else str(item)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 1 and array.size == 1:
        return bool(int(array.reshape(-1)[0]) == ord("T"))
    if array.size == 1 and array.ndim <= 1:
        item = array.reshape(-1)[0]
        if array.dtype.kind in "iu":
            return int(item)
        # float32 -> the shortest decimal that rounds to it (1.7f reads back as 1.7, not 1.7000000477)
        return float(str(item)) if array.dtype == np.float32 else float(item)
    return array.reshape(-1).copy()


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------


def projection_matrix(rot, tilt, psi, origin_x_px, origin_y_px) -> np.ndarray:
    """SPHIRE ``xform.projection`` matrices for RELION poses, shape ``(n, 3, 4)``.

    The matrix is ``[A | t]`` with ``A`` from :func:`~isavar.conventions.euler_to_matrix`
    (EMAN2's ``Transform({"type": "spider", ...})``) and ``t = (-origin_x_px,
    -origin_y_px, 0)``: SPHIRE's ``set_params_proj`` stores ``set_trans(-s2x, -s2y)``
    and its projection shift ``s2x`` is RELION's origin (``sp_relion2sphire``
    passes ``rlnOriginX`` as ``s2x``; SPHIRE's reconstructors shift each image by
    ``-t`` before inserting it).
    """
    a = euler_to_matrix(rot, tilt, psi).reshape(-1, 3, 3)
    tx, ty = origin_to_sphire_trans(origin_x_px, origin_y_px)
    t = np.zeros((a.shape[0], 3, 1))
    t[:, 0, 0] = tx
    t[:, 1, 0] = ty
    return np.concatenate([a, t], axis=2)


def projection_params(matrix) -> tuple[float, float, float, float, float]:
    """Invert :func:`projection_matrix` for one matrix: ``(rot, tilt, psi, origin_x_px, origin_y_px)``."""
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 4)
    rot, tilt, psi = matrix_to_euler(m[:, :3])
    ox, oy = sphire_trans_to_origin(m[0, 3], m[1, 3])
    return float(rot), float(tilt), float(psi), float(ox), float(oy)


def align2d_matrix(alpha, sx, sy, mirror) -> np.ndarray:
    """EMAN2 2D ``Transform`` matrices ``M**mirror [R(alpha) | (sx, sy)]``, shape ``(n, 3, 4)``.

    ``R(a) = [[cos a, sin a], [-sin a, cos a]]`` and the mirror negates row 0
    (translation included), as EMAN2's ``Transform::set_mirror`` does.
    """
    alpha, sx, sy, mirror = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (alpha, sx, sy, mirror)))
    a = np.deg2rad(alpha).reshape(-1)
    n = a.size
    m = np.zeros((n, 3, 4))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = np.cos(a), np.sin(a), -np.sin(a), np.cos(a)
    m[:, 2, 2] = 1.0
    m[:, 0, 3], m[:, 1, 3] = sx.reshape(-1), sy.reshape(-1)
    flip = mirror.reshape(-1) > 0.5
    m[flip, 0, :] *= -1.0
    return m


def align2d_params(matrix) -> tuple[float, float, float, int]:
    """Invert :func:`align2d_matrix` for one matrix: ``(alpha_deg, sx, sy, mirror)``."""
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 4).copy()
    mirror = int(np.linalg.det(m[:2, :2]) < 0)
    if mirror:
        m[0, :] *= -1.0
    alpha = float(np.rad2deg(np.arctan2(m[0, 1], m[0, 0])))
    return alpha, float(m[0, 3]), float(m[1, 3]), mirror


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _image_names(fh: h5py.File, path) -> list[str]:
    if "MDF" not in fh or "images" not in fh["MDF"]:
        raise InputError("not an EMAN2/SPHIRE image file (no /MDF/images group)", path=path)
    names = [k for k in fh["MDF/images"].keys() if k.isdigit()]
    return sorted(names, key=int)


def _decode_image(group: h5py.Group, data: np.ndarray) -> np.ndarray:
    bits = group.attrs.get("EMAN.stored_renderbits")
    data = np.asarray(data, dtype=np.float32)
    if bits is not None and int(np.asarray(bits).reshape(-1)[0]) > 0:
        bits = int(np.asarray(bits).reshape(-1)[0])
        lo = float(np.asarray(group.attrs["EMAN.stored_rendermin"]).reshape(-1)[0])
        hi = float(np.asarray(group.attrs["EMAN.stored_rendermax"]).reshape(-1)[0])
        data = data / np.float32((1 << bits) - 1) * np.float32(hi - lo) + np.float32(lo)
    return data


class HdfSource(ImageSource):
    """Images ``/MDF/images/<i>/image`` of one EMAN2 HDF file.

    ``render`` maps image positions to ``(bits, min, max)`` for images EMAN2
    stored bit-reduced (``EMAN.stored_renderbits`` > 0), which are rescaled on read.
    """

    def __init__(self, path, names: list[str], box: int, render: dict | None = None):
        super().__init__(str(path), len(names), box)
        self.names = names
        self.render = render or {}

    def open(self):
        try:
            return h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"cannot open HDF5 file ({exc})", path=self.path) from None

    def read(self, handle, indices):
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        for k, i in enumerate(indices):
            i = int(i)
            key = f"/MDF/images/{self.names[i]}/image".encode()
            dsid = h5py.h5d.open(handle.id, key)
            if dsid.dtype == np.float32 and dsid.shape == (self.box, self.box):
                dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, out[k])
            else:
                data = handle[key.decode()][()]
                if data.ndim == 3 and data.shape[0] == 1:
                    data = data[0]
                if data.shape != (self.box, self.box):
                    raise InputError(f"image {i} has shape {data.shape}, expected {(self.box, self.box)}",
                                     path=self.path)
                out[k] = data
            if i in self.render:
                bits, lo, hi = self.render[i]
                out[k] = out[k] / np.float32((1 << bits) - 1) * np.float32(hi - lo) + np.float32(lo)
        return out

    def close(self, handle):
        handle.close()


def _render_info(headers: list[dict]) -> dict:
    render = {}
    for i, h in enumerate(headers):
        bits = h.get("stored_renderbits")
        if isinstance(bits, int) and bits > 0:
            render[i] = (bits, float(h.get("stored_rendermin", 0.0)), float(h.get("stored_rendermax", 0.0)))
    return render


def _read_headers(fh: h5py.File, names: list[str]) -> tuple[list[dict], list[tuple]]:
    headers, shapes = [], []
    for name in names:
        gid = h5py.h5g.open(fh.id, f"/MDF/images/{name}".encode())
        header = {key: read_eman_attr(value) for key, value in read_group_attrs(gid).items()}
        try:
            shapes.append(h5py.h5d.open(gid, b"image").shape)
        except KeyError:
            raise InputError(f"image group {name} has no 'image' dataset", path=fh.filename) from None
        headers.append(header)
    return headers, shapes


def _header_columns(headers: list[dict], path) -> pd.DataFrame:
    rows = []
    for h in headers:
        row = {}
        apix = h.get("apix_x")
        ctf = h.get("ctf")
        if isinstance(ctf, str) and ctf.startswith("E"):
            try:
                c = parse_eman2_ctf(ctf)
            except ValueError as exc:
                raise InputError(f"bad EMAN2 CTF string: {exc}", path=path) from None
            u, v, ang = eman_to_relion_defocus(c["defocus_um"], c["dfdiff_um"], c["dfang_deg"])
            row.update(defocus_u_A=float(u), defocus_v_A=float(v), defocus_angle_deg=float(ang),
                       voltage_kV=c["voltage_kV"], cs_mm=c["cs_mm"],
                       amplitude_contrast=float(ampcont_percent_to_fraction(c["ampcont_percent"])),
                       ctf_bfactor_A2=c["bfactor_A2"])
            if apix is None:
                apix = c["apix_A"]
        if apix is not None:
            row["pixel_size_A"] = float(apix)
        proj = h.get("xform.projection")
        if isinstance(proj, np.ndarray) and proj.shape == (3, 4):
            rot, tilt, psi, ox, oy = projection_params(proj)
            row.update(angle_rot_deg=rot, angle_tilt_deg=tilt, angle_psi_deg=psi)
            if apix:
                row.update(origin_x_A=ox * float(apix), origin_y_A=oy * float(apix))
            else:  # shifts known in pixels only: kept so that a pixel size given later (--apix) converts them
                row.update(origin_x_A=np.nan, origin_y_A=np.nan, origin_x_px=ox, origin_y_px=oy)
        a2d = h.get("xform.align2d")
        if isinstance(a2d, np.ndarray) and a2d.shape == (3, 4):
            alpha, sx, sy, mirror = align2d_params(a2d)
            row.update(align_alpha_deg=alpha, align_sx_px=sx, align_sy_px=sy, align_mirror=mirror)
        if "ptcl_source_image" in h:
            row["micrograph_name"] = str(h["ptcl_source_image"])
        coord = h.get("ptcl_source_coord")
        if isinstance(coord, np.ndarray) and coord.size >= 2:
            row["coordinate_x_px"], row["coordinate_y_px"] = float(coord[0]), float(coord[1])
        if "segment_angle" in h:
            row["segment_angle_deg"] = float(h["segment_angle"])
        for key, value in h.items():
            if key in _INTERNAL_KEYS or key in _MAPPED_KEYS:
                continue
            if value is None or (isinstance(value, np.ndarray) and value.ndim == 2):
                continue
            row[key] = value
        rows.append(row)
    return pd.DataFrame(rows)


def _open_images(path: Path):
    """Open an EMAN2 HDF file for reading; returns the open file and its image group names (never empty)."""
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"cannot open as HDF5 ({exc})", path=path) from None
    names = _image_names(fh, path)
    if not names:
        fh.close()
        raise InputError("the file holds no images", path=path)
    return fh, names


def read_hdf(path) -> ParticleStack:
    """Read an EMAN2/SPHIRE HDF image stack and its per-image headers.

    Parameters
    ----------
    path : path
        ``.hdf`` file with ``/MDF/images/<i>/image`` datasets.

    Returns
    -------
    ParticleStack
    """
    path = Path(path)
    fh, names = _open_images(path)
    with fh:
        headers, shapes = _read_headers(fh, names)
    shapes2d = {s[-2:] if (len(s) == 2 or (len(s) == 3 and s[0] == 1)) else s for s in shapes}
    if len(shapes2d) > 1:
        raise InputError(f"images have mixed sizes ({sorted(shapes2d)[:3]})", path=path)
    shape = shapes2d.pop()
    if len(shape) != 2:
        raise InputError(f"expected 2D images, found data of shape {shape} (a volume? use read_volume)", path=path)
    if shape[0] != shape[1]:
        raise InputError(f"images are not square ({shape[1]}x{shape[0]} pixels)", path=path)
    src = HdfSource(path.resolve(), names, shape[0], _render_info(headers))
    table = _header_columns(headers, path)
    table.insert(0, "image_index", np.arange(len(names), dtype=np.int64))
    table.insert(0, "image_path", str(path.resolve()))
    table["image_size_px"] = shape[0]
    table = coerce_dtypes(table)
    images = LazyImages([src], np.zeros(len(names), np.int64), np.arange(len(names)))
    pixel = None
    if "pixel_size_A" in table.columns and not table["pixel_size_A"].isna().all():
        pixel = float(table["pixel_size_A"].dropna().iloc[0])
    return ParticleStack(table=table, images=images, pixel_size_A=pixel, path=str(path))


def read_hdf_volume(path) -> tuple[np.ndarray, float | None]:
    """Read image 0 of an EMAN2 HDF file as a volume ``(nz, ny, nx)`` float32 and its voxel size."""
    path = Path(path)
    fh, names = _open_images(path)
    with fh:
        group = fh["MDF/images"][names[0]]
        volume = _decode_image(group, group["image"][()])
        apix = group.attrs.get("EMAN.apix_x")
    if volume.ndim != 3:
        raise InputError(f"expected a 3D volume, got data of shape {volume.shape}", path=path)
    if not np.isfinite(volume).all():
        raise InputError("volume contains NaN or Inf voxels", path=path)
    voxel = None if apix is None else float(np.asarray(apix).reshape(-1)[0])
    return volume, voxel


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _base_header(data: np.ndarray, apix: float) -> dict:
    shape = data.shape
    nz, ny, nx = (1,) + shape if data.ndim == 2 else shape
    # EMAN2 takes nx/ny/nz from the header; the statistics, datatype and is_complex* flags are
    # defaults or recomputed when EMAN2 reads an image, so they are not written (speed).
    return {"nx": int(nx), "ny": int(ny), "nz": int(nz), "apix_x": float(apix), "apix_y": float(apix),
            "apix_z": float(apix)}


def _present(table: pd.DataFrame, columns) -> bool:
    return all(c in table.columns for c in columns)


def _row_headers(table: pd.DataFrame) -> list[dict]:
    """Per-row EMAN header dicts (beyond the data-derived keys)."""
    n = len(table)
    headers = [dict() for _ in range(n)]
    used = {"image_path", "image_index", "image_size_px", "pixel_size_A"}
    apix = table["pixel_size_A"].to_numpy(dtype=np.float64)
    if _present(table, CTF_COLUMNS):
        used.update(CTF_COLUMNS)
        bfactor = table["ctf_bfactor_A2"].to_numpy(np.float64) if "ctf_bfactor_A2" in table else np.zeros(n)
        if "ctf_bfactor_A2" in table:
            used.add("ctf_bfactor_A2")
        d, dd, da = relion_to_eman_defocus(table["defocus_u_A"], table["defocus_v_A"], table["defocus_angle_deg"])
        amp = ampcont_fraction_to_percent(table["amplitude_contrast"])
        for i in range(n):
            if np.isnan([d[i], dd[i], da[i], amp[i]]).any():
                continue
            headers[i]["ctf"] = format_eman2_ctf(
                defocus_um=d[i], dfdiff_um=dd[i], dfang_deg=da[i], bfactor_A2=np.nan_to_num(bfactor[i]),
                ampcont_percent=amp[i], voltage_kV=table["voltage_kV"].iloc[i], cs_mm=table["cs_mm"].iloc[i],
                apix_A=apix[i])
            headers[i]["ctf_applied"] = 0
    if _present(table, ORIENTATION_COLUMNS):
        used.update(ORIENTATION_COLUMNS)
        ox = table["origin_x_A"].to_numpy(np.float64) / apix if "origin_x_A" in table else np.zeros(n)
        oy = table["origin_y_A"].to_numpy(np.float64) / apix if "origin_y_A" in table else np.zeros(n)
        used.update(c for c in ("origin_x_A", "origin_y_A") if c in table)
        if "origin_x_px" in table and "origin_y_px" in table:   # origins read in pixels, pixel size unknown
            ox = np.where(np.isnan(ox), table["origin_x_px"].to_numpy(np.float64), ox)
            oy = np.where(np.isnan(oy), table["origin_y_px"].to_numpy(np.float64), oy)
            used.update(("origin_x_px", "origin_y_px"))
        mats = projection_matrix(table["angle_rot_deg"], table["angle_tilt_deg"], table["angle_psi_deg"],
                                 np.nan_to_num(ox), np.nan_to_num(oy))
        for i in range(n):
            if np.isfinite(mats[i]).all():
                headers[i]["xform.projection"] = transform_value(mats[i])
    if _present(table, ALIGN2D_COLUMNS):
        used.update(ALIGN2D_COLUMNS)
        mats = align2d_matrix(table["align_alpha_deg"], table["align_sx_px"], table["align_sy_px"],
                              table["align_mirror"].astype(np.float64))
        for i in range(n):
            if np.isfinite(mats[i]).all():
                headers[i]["xform.align2d"] = transform_value(mats[i])
    if "micrograph_name" in table:
        used.add("micrograph_name")
        for i, v in enumerate(table["micrograph_name"]):
            if isinstance(v, str) and v not in ("", "nan"):
                headers[i]["ptcl_source_image"] = v
    if _present(table, ("coordinate_x_px", "coordinate_y_px")):
        used.update(("coordinate_x_px", "coordinate_y_px"))
        xy = table[["coordinate_x_px", "coordinate_y_px"]].to_numpy(np.float64)
        for i in range(n):
            if np.isfinite(xy[i]).all():
                headers[i]["ptcl_source_coord"] = xy[i].astype(np.int64) if np.all(xy[i] == np.round(xy[i])) \
                    else xy[i].astype(np.float32)
    if "segment_angle_deg" in table:
        used.add("segment_angle_deg")
        for i, v in enumerate(table["segment_angle_deg"]):
            if pd.notna(v):
                headers[i]["segment_angle"] = float(v)
    skipped = set()
    for column in table.columns:
        if column in used:
            continue
        values = table[column].tolist()
        for i, v in enumerate(values):
            value = _plain_value(v)
            if value is None:
                continue
            if value is _UNSTORABLE:
                skipped.add(column)
                continue
            headers[i][column] = value
    if skipped:
        log.warning("HDF output: columns with values EMAN2 cannot store were not written: %s",
                    ", ".join(sorted(skipped)))
    return headers


_UNSTORABLE = object()


def _plain_value(v):
    if v is None or v is pd.NA:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v) if -2**31 <= int(v) < 2**31 else float(v)
    if isinstance(v, (float, np.floating)):
        return None if np.isnan(v) else np.float64(v)
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, np.ndarray)):
        arr = np.asarray(v)
        return arr if arr.ndim == 1 and arr.dtype.kind in "iubf" else _UNSTORABLE
    return _UNSTORABLE


def write_hdf(path, chunks, table: pd.DataFrame, *, pixel_size_A: float | None = None,
              overwrite: bool = False) -> None:
    """Write an EMAN2/SPHIRE HDF image stack with the table as per-image headers.

    Parameters
    ----------
    path : path
        Output ``.hdf``.
    chunks : iterable of numpy.ndarray
        Image blocks ``(k, N, N)`` in table order.
    table : pandas.DataFrame
        One row per image.
    pixel_size_A : float, optional
        Pixel size where the table has none (EMAN2's default 1.0 if neither).
    overwrite : bool
        Replace an existing file.
    """
    path = check_writable(path, overwrite)
    table = table.reset_index(drop=True).copy()
    if "pixel_size_A" not in table.columns:
        table["pixel_size_A"] = float(pixel_size_A) if pixel_size_A else 1.0
    else:
        table["pixel_size_A"] = table["pixel_size_A"].astype(np.float64).fillna(
            float(pixel_size_A) if pixel_size_A else 1.0)
    headers = _row_headers(table)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with h5py.File(tmp, "w") as fh:
            images = fh.create_group("MDF").create_group("images")
            for block in chunks:
                block = np.asarray(block, dtype=np.float32)
                if block.ndim == 2:
                    block = block[None]
                if not np.isfinite(block).all():
                    raise InputError(f"image block starting at image {n + 1} has NaN or Inf pixels", path=path)
                _ensure_space(tmp, path, block.nbytes)
                for image in block:
                    if n >= len(table):
                        raise ValueError(f"more images than the table's {len(table)} rows")
                    _write_image(images, n, image, float(table["pixel_size_A"].iloc[n]), headers[n])
                    n += 1
            if n != len(table):
                raise ValueError(f"{n} images written but the table has {len(table)} rows")
            images.attrs.create("imageid_max", np.array([n - 1], dtype=np.int32))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _ensure_space(tmp: Path, path: Path, nbytes: int) -> None:
    """Stop with ENOSPC before HDF5 runs out of disk space (the HDF5 library crashes when a write fails)."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        return
    if free < 2 * nbytes + (1 << 20):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _write_image(images: h5py.Group, i: int, data: np.ndarray, apix: float, extra: dict) -> None:
    group = images.create_group(str(i))
    group.create_dataset("image", data=np.ascontiguousarray(data, dtype=np.float32))
    header = _base_header(data, apix)
    header.update(extra)
    for key, value in header.items():
        write_eman_attr(group, key, value)


def write_hdf_volume(path, volume: np.ndarray, voxel_size_A: float | None, *, overwrite: bool = False) -> None:
    """Write a volume as image 0 of an EMAN2 HDF file."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise InputError("volume to write contains NaN or Inf voxels", path=path)
    path = check_writable(path, overwrite)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as fh:
            images = fh.create_group("MDF").create_group("images")
            _write_image(images, 0, volume, float(voxel_size_A) if voxel_size_A else 1.0, {})
            images.attrs.create("imageid_max", np.array([0], dtype=np.int32))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
