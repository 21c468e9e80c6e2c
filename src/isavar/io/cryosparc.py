"""cryoSPARC ``.cs`` particle files (a numpy structured array in ``.npy`` format).

Field mapping (as pyem's ``csparc2star`` converts them)
-------------------------------------------------------
=============================  ===========================================================
cryoSPARC field                column
=============================  ===========================================================
``uid``                        ``uid`` (kept, written back unchanged)
``blob/path``, ``blob/idx``    ``image_path`` (resolved), ``image_index`` (both 0-based)
``blob/shape``                 ``image_size_px``
``blob/psize_A``               ``pixel_size_A``
``ctf/df1_A``, ``ctf/df2_A``   ``defocus_u_A``, ``defocus_v_A``
``ctf/df_angle_rad``           ``defocus_angle_deg`` (radians -> degrees)
``ctf/phase_shift_rad``        ``phase_shift_deg``
``ctf/accel_kv``, ``cs_mm``    ``voltage_kV``, ``cs_mm``
``ctf/amp_contrast``           ``amplitude_contrast`` (a fraction in both)
``ctf/exp_group_id``           ``optics_group`` (+1)
``alignments3D/pose``          ``angle_rot/tilt/psi_deg`` via ``axis_angle_to_matrix``
``alignments3D/shift``         ``origin_x/y_A`` = shift (px, same sign as RELION's
                               origin) x ``alignments3D/psize_A`` (or ``blob/psize_A``)
``alignments2D/pose``, shift   ``align_*`` via RELION psi = pose (deg), origin = shift; without
                               a 3D pose also ``angle_psi_deg``, ``angle_tilt_deg`` (0, or 180
                               for an isavar mirror) and ``origin_x/y_A``, as isac2 writes them
``alignments2D/class``         ``class_number`` (+1)
``isavar/<column>``            ``<column>`` (isavar's own fields for columns cryoSPARC
                               has no field for, e.g. ``true_*``, ``align_mirror``)
anything else                  kept under its field name; a vector field ``f`` of
                               length k becomes columns ``f/0`` ... ``f/<k-1>``
=============================  ===========================================================

Relative ``blob/path`` values are resolved against the ``.cs`` folder and up to
three of its parents (cryoSPARC stores them relative to the project folder).
Written files name their stack relative to the ``.cs`` file's folder.

Formats: the numpy ``.npy`` layout is read and written with numpy (it is what
cryoSPARC and cryosparc-tools write by default); cryosparc-tools' compressed
stream format (``\x95CSDAT``) is read through cryosparc-tools when it is
installed (the optional extra ``isavar[cryosparc]``). Written files complete
every slot they use (``blob``, ``ctf``, ``alignments3D``, ``alignments2D``) with
all the fields cryoSPARC's own particle files have (:data:`SLOT_FIELDS`):
``blob/sign`` = +1 (isavar images are in RELION's contrast, protein density
positive), ``ctf/type`` = ``imported``, ``ctf/scale`` = 1 (or ``ctf_scale``),
``alignments*/split`` = ``rlnRandomSubset`` - 1 (or alternating 0/1), unit
weights and posteriors, zeros for the higher-order aberrations.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from isavar.conventions import (
    align2d_to_relion,
    axis_angle_to_matrix,
    euler_to_matrix,
    matrix_to_axis_angle,
    matrix_to_euler,
    relion_to_align2d,
)
from isavar.errors import InputError
from isavar.io.mrc import float32_value, sources_for_paths
from isavar.io.particles import (
    ALIGN2D_COLUMNS,
    CANONICAL_COLUMNS,
    CRYOSPARC_CUSTOM_PREFIX,
    CRYOSPARC_FIELDS,
    CTF_COLUMNS,
    ORIENTATION_COLUMNS,
    coerce_dtypes,
)
from isavar.io.stack import LazyImages, ParticleStack, release_freed_memory

log = logging.getLogger(__name__)

_SIMPLE_FIELDS = {field: column for column, field in CRYOSPARC_FIELDS.items()}
_HANDLED = set(_SIMPLE_FIELDS) | {
    "blob/path", "blob/idx", "blob/shape", "ctf/df_angle_rad", "ctf/phase_shift_rad", "ctf/exp_group_id",
    "alignments3D/pose", "alignments3D/shift", "alignments2D/pose", "alignments2D/shift", "alignments2D/class",
}
_VECTOR_COLUMN = re.compile(r"^(.*)/(\d+)$")


#: First bytes of cryosparc-tools' compressed stream format (``Dataset.save(format=CSDAT_FORMAT)``).
CSDAT_MAGIC = b"\x95CSDAT"


def _load_compressed(path: Path) -> np.ndarray:
    """Read cryosparc-tools' compressed ``.cs`` format through cryosparc-tools itself (the format's owner)."""
    try:
        from cryosparc.dataset import Dataset
    except ImportError:
        raise InputError("saved in cryosparc-tools' compressed .cs format, which needs cryosparc-tools to read: "
                         "pip install 'isavar[cryosparc]' (or cryosparc-tools)", path=path) from None
    try:
        records = Dataset.load(str(path)).to_records(fixed=True)
    except Exception as exc:
        raise InputError(f"cryosparc-tools cannot read it ({type(exc).__name__}: {exc})", path=path) from None
    return np.asarray(records).view(np.ndarray).reshape(-1)


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputError("file not found", path=path)
    with open(path, "rb") as fh:
        if fh.read(len(CSDAT_MAGIC)) == CSDAT_MAGIC:
            return _load_compressed(path)
    try:
        with open(path, "rb") as fh:
            data = np.load(fh, allow_pickle=False)
    except ValueError as exc:
        raise InputError(f"cannot read as a cryoSPARC .cs (numpy) file ({exc}); files holding Python objects "
                         "are not supported — re-export with cryosparc-tools", path=path) from None
    except Exception as exc:
        raise InputError(f"cannot read as a cryoSPARC .cs (numpy) file ({type(exc).__name__}: {exc})",
                         path=path) from None
    if not isinstance(data, np.ndarray) or data.dtype.names is None:
        raise InputError("not a cryoSPARC .cs file (no structured array)", path=path)
    return data.reshape(-1)


def _text(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _text_column(values: np.ndarray):
    """A text field as a column: a categorical when values repeat (a micrograph path per particle), else str."""
    from isavar.io.star import factorize_runs

    if values.dtype.kind == "O":
        return _text(values)
    codes, uniques = factorize_runs(values)
    if len(uniques) * 4 > len(values):
        return _text(values)
    return pd.Categorical.from_codes(codes, categories=pd.Index(_text(uniques), dtype=object))


def _resolve_blobs(names: list[str], folder: Path) -> list[Path]:
    """:func:`_resolve_blob` of many names, with the candidate folders looked up once per directory named."""
    bases = [folder, *list(folder.parents)[:3]]
    dirs_of: dict[str, list[str]] = {}
    out = []
    for raw in names:
        name = raw.lstrip(">")
        if os.path.isabs(name):
            out.append(Path(name))
            continue
        sub, base = os.path.split(name)
        dirs = dirs_of.get(sub)
        if dirs is None:
            dirs = dirs_of[sub] = [os.path.join(b, sub) for b in bases if os.path.isdir(os.path.join(b, sub))]
        hit = next((os.path.join(d, base) for d in dirs if os.path.exists(os.path.join(d, base))), None)
        out.append(Path(os.path.realpath(hit)) if hit is not None else (folder / name).resolve())
    return out


def _resolve_blob(raw: str, folder: Path) -> Path:
    raw = raw.lstrip(">")
    p = Path(raw)
    if p.is_absolute():
        return p
    for base in (folder, *list(folder.parents)[:3]):
        if (base / p).exists():
            return (base / p).resolve()
    return (folder / p).resolve()


#: Fields holding text; every other field isavar interprets must hold numbers.
_TEXT_FIELDS = ("blob/path", "location/micrograph_path")


def _check_field_types(cs: np.ndarray, path: Path) -> None:
    """Refuse fields isavar interprets whose values have the wrong type (text defocus, float indices)."""
    for field in sorted(_HANDLED - set(_TEXT_FIELDS)):
        if field in cs.dtype.names and cs[field].dtype.kind not in "iufb":
            raise InputError(f"field {field} holds {cs[field].dtype} values, not numbers", path=path)
    if cs["blob/idx"].dtype.kind not in "iu":
        raise InputError(f"field blob/idx holds {cs['blob/idx'].dtype} values; image indices must be integers",
                         path=path)


def _check_blob_shape(cs: np.ndarray, images: LazyImages, path: Path) -> None:
    if "blob/shape" not in cs.dtype.names or not len(cs):
        return
    shape = np.asarray(cs["blob/shape"]).reshape(len(cs), -1)
    bad = np.flatnonzero((shape != images.box).any(axis=1))
    if shape.shape[1] != 2 or bad.size:
        row = int(bad[0]) if bad.size else 0
        raise InputError(f"blob/shape of particle {row + 1} is {' x '.join(map(str, shape[row]))} but its stack "
                         f"holds {images.box} x {images.box} images", path=path)


def read_cs(path) -> ParticleStack:
    """Read a cryoSPARC particle ``.cs`` file and its image stacks.

    Parameters
    ----------
    path : path
        The ``.cs`` file (with ``blob/path`` and ``blob/idx``).

    Returns
    -------
    ParticleStack
    """
    path = Path(path)
    cs = _load(path)
    names = cs.dtype.names
    if "blob/path" not in names or "blob/idx" not in names:
        raise InputError("no blob/path and blob/idx fields (not a particle .cs file)", path=path)
    _check_field_types(cs, path)
    from isavar.io.star import factorize_runs

    codes, unique = factorize_runs(cs["blob/path"])
    unique = [u.decode("utf-8") if isinstance(u, bytes) else str(u) for u in unique]
    resolved = _resolve_blobs(unique, path.parent)
    missing = [k for k, p in enumerate(resolved) if not p.exists()]
    if missing:
        r = unique[missing[0]]
        more = f"; {len(missing)} of the {len(unique)} image stacks it names are missing" if len(unique) > 1 else ""
        raise InputError(f"image stack {r} referenced by blob/path not found (looked for {resolved[missing[0]]}"
                         f"{more})", path=path)
    sources, sid = sources_for_paths(resolved)
    indices = cs["blob/idx"].astype(np.int64)
    images = LazyImages(sources, sid[codes], indices)
    _check_blob_shape(cs, images, path)

    cols: dict[str, np.ndarray] = {"image_path": images.path_column(), "image_index": indices}
    if "uid" in names:
        cols["uid"] = cs["uid"]
    for field, column in _SIMPLE_FIELDS.items():
        if field in names:
            cols[column] = _text_column(cs[field]) if cs[field].dtype.kind in "SOU" else cs[field].astype(np.float64)
    if "blob/shape" in names:
        cols["image_size_px"] = np.asarray(cs["blob/shape"]).reshape(len(cs), -1)[:, 0].astype(np.int64)
    if "ctf/df_angle_rad" in names:
        cols["defocus_angle_deg"] = np.rad2deg(cs["ctf/df_angle_rad"].astype(np.float64))
    if "ctf/phase_shift_rad" in names:
        cols["phase_shift_deg"] = np.rad2deg(cs["ctf/phase_shift_rad"].astype(np.float64))
    if "ctf/exp_group_id" in names:
        cols["optics_group"] = cs["ctf/exp_group_id"].astype(np.int64) + 1
    _read_alignments(cs, cols)
    has_3d = "alignments3D/pose" in names
    for field in names:
        if field in _HANDLED or field == "uid":
            continue
        values = cs[field]
        if field.startswith(CRYOSPARC_CUSTOM_PREFIX):
            name = field[len(CRYOSPARC_CUSTOM_PREFIX):]
            cols[name] = _text_column(values) if values.dtype.kind in "SOU" else values
        elif values.ndim > 1:
            flat = values.reshape(len(cs), -1)
            for k in range(flat.shape[1]):
                cols[f"{field}/{k}"] = flat[:, k]
        else:
            cols[field] = _text_column(values) if values.dtype.kind in "SOU" else values
    if not has_3d and all(c in cols for c in ALIGN2D_COLUMNS) and "pixel_size_A" in cols:
        _relion_2d_pose(cols)
    for column in ("pixel_size_A", "alignments3D/psize_A", "alignments2D/psize_A"):
        if column in cols and np.asarray(cols[column]).dtype == np.float32 or column == "pixel_size_A" and column in cols:
            values = np.asarray(cols[column], dtype=np.float32)
            uniq, inverse = np.unique(values, return_inverse=True)
            cols[column] = np.array([float32_value(u) for u in uniq])[inverse.reshape(-1)]
    table = coerce_dtypes(pd.DataFrame(cols))
    pixel = float(table["pixel_size_A"].iloc[0]) if "pixel_size_A" in table else None
    if pixel is None and sources[0].pixel_size_A:
        pixel = sources[0].pixel_size_A
    del cs, cols
    release_freed_memory()
    return ParticleStack(table=table, images=images, pixel_size_A=pixel, path=str(path))


def _relion_2d_pose(cols: dict) -> None:
    """RELION 2D pose columns from the 2D alignment, as ``isavar isac2`` writes them.

    ``angle_psi_deg``, ``angle_tilt_deg`` (180 for a mirror, from ``isavar/align_mirror``
    when present; cryoSPARC itself has no mirror) and ``origin_x/y_A``; no
    ``angle_rot_deg``, so the particles are not mistaken for 3D-oriented ones.
    """
    psi, tilt, ox, oy = align2d_to_relion(cols["align_alpha_deg"], cols["align_sx_px"], cols["align_sy_px"],
                                          np.asarray(cols["align_mirror"]).astype(np.int64))
    apix = np.asarray(cols["pixel_size_A"], np.float64)
    cols.update(angle_psi_deg=psi, angle_tilt_deg=tilt, origin_x_A=ox * apix, origin_y_A=oy * apix)


def _read_alignments(cs: np.ndarray, cols: dict) -> None:
    names = cs.dtype.names
    psize = cs["blob/psize_A"].astype(np.float64) if "blob/psize_A" in names else None
    if "alignments3D/pose" in names:
        rot, tilt, psi = matrix_to_euler(axis_angle_to_matrix(cs["alignments3D/pose"].astype(np.float64)))
        cols.update(angle_rot_deg=rot, angle_tilt_deg=tilt, angle_psi_deg=psi)
        if "alignments3D/shift" in names:
            scale = cs["alignments3D/psize_A"].astype(np.float64) if "alignments3D/psize_A" in names else psize
            if scale is not None:
                shift = cs["alignments3D/shift"].astype(np.float64)
                cols["origin_x_A"] = shift[:, 0] * scale
                cols["origin_y_A"] = shift[:, 1] * scale
    if "alignments2D/pose" in names:
        pose = cs["alignments2D/pose"].astype(np.float64).reshape(len(cs), -1)[:, 0]
        shift = cs["alignments2D/shift"].astype(np.float64) if "alignments2D/shift" in names \
            else np.zeros((len(cs), 2))
        alpha, sx, sy, mirror = relion_to_align2d(np.rad2deg(pose), 0.0, shift[:, 0], shift[:, 1])
        cols.update(align_alpha_deg=alpha, align_sx_px=sx, align_sy_px=sy, align_mirror=mirror)
    if "alignments2D/class" in names:
        cols["class_number"] = cs["alignments2D/class"].astype(np.int64) + 1


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _has(table: pd.DataFrame, columns) -> bool:
    return all(c in table.columns and not table[c].isna().any() for c in columns)


def _string_field(values) -> np.ndarray:
    data = [str(v).encode("utf-8") for v in values]
    width = max((len(d) for d in data), default=1) or 1
    return np.array(data, dtype=f"S{width}")


def build_cs_array(table: pd.DataFrame, stack_name: str, box: int, *, rng=None) -> np.ndarray:
    """Build the structured array of a ``.cs`` file for images ``0..n-1`` of ``stack_name``.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table (``pixel_size_A`` required).
    stack_name : str
        Value of ``blob/path``.
    box : int
        Image size in pixels.
    rng : numpy.random.Generator, optional
        Source of new ``uid`` values when the table has no ``uid`` column.

    Returns
    -------
    numpy.ndarray
        Structured array, one record per row.
    """
    table = table.reset_index(drop=True)
    n = len(table)
    fields: dict[str, np.ndarray] = {}
    if "uid" in table.columns:
        fields["uid"] = table["uid"].to_numpy().astype(np.uint64)
    else:
        rng = np.random.default_rng() if rng is None else rng
        fields["uid"] = rng.integers(1, np.iinfo(np.int64).max, size=n, dtype=np.int64).astype(np.uint64)
    psize = table["pixel_size_A"].to_numpy(np.float64)
    fields["blob/path"] = _string_field([stack_name] * n)
    fields["blob/idx"] = np.arange(n, dtype=np.uint32)
    fields["blob/shape"] = np.tile(np.array([box, box], dtype=np.uint32), (n, 1))
    fields["blob/psize_A"] = psize.astype(np.float32)
    used = {"image_path", "image_index", "image_size_px", "pixel_size_A", "uid"}
    for field, column in _SIMPLE_FIELDS.items():
        if column in table.columns and column not in used and field not in fields:
            if column == "micrograph_name":
                fields[field] = _string_field(table[column])
            else:
                fields[field] = table[column].to_numpy(np.float64).astype(np.float32)
            used.add(column)
    if "defocus_angle_deg" in table:
        fields["ctf/df_angle_rad"] = np.deg2rad(table["defocus_angle_deg"].to_numpy(np.float64)).astype(np.float32)
        used.add("defocus_angle_deg")
    if _has(table, CTF_COLUMNS) or "phase_shift_deg" in table:
        phase = table["phase_shift_deg"].to_numpy(np.float64) if "phase_shift_deg" in table else np.zeros(n)
        fields["ctf/phase_shift_rad"] = np.deg2rad(phase).astype(np.float32)
        used.add("phase_shift_deg")
    if "optics_group" in table:
        fields["ctf/exp_group_id"] = (table["optics_group"].to_numpy(np.int64) - 1).astype(np.uint32)
        used.add("optics_group")
    if _has(table, ORIENTATION_COLUMNS):
        a = euler_to_matrix(table["angle_rot_deg"], table["angle_tilt_deg"], table["angle_psi_deg"])
        fields["alignments3D/pose"] = matrix_to_axis_angle(a).astype(np.float32)
        ox = table["origin_x_A"].to_numpy(np.float64) if "origin_x_A" in table else np.zeros(n)
        oy = table["origin_y_A"].to_numpy(np.float64) if "origin_y_A" in table else np.zeros(n)
        fields["alignments3D/shift"] = np.stack([ox / psize, oy / psize], axis=1).astype(np.float32)
        fields["alignments3D/psize_A"] = psize.astype(np.float32)
        used.update(ORIENTATION_COLUMNS)
        used.update(c for c in ("origin_x_A", "origin_y_A") if c in table)
    if _has(table, ALIGN2D_COLUMNS):
        psi, _, ox, oy = align2d_to_relion(table["align_alpha_deg"], table["align_sx_px"], table["align_sy_px"],
                                           table["align_mirror"])
        fields["alignments2D/pose"] = np.deg2rad(psi).astype(np.float32)
        fields["alignments2D/shift"] = np.stack([ox, oy], axis=1).astype(np.float32)
        fields["alignments2D/psize_A"] = psize.astype(np.float32)
        if (table["align_mirror"] != 0).any():
            log.warning("cryoSPARC has no 2D mirror flag: alignments2D/pose ignores align_mirror "
                        "(the exact values are kept in isavar/align_* fields)")
        for c in ALIGN2D_COLUMNS:
            fields[CRYOSPARC_CUSTOM_PREFIX + c] = table[c].to_numpy(np.float64)
        used.update(ALIGN2D_COLUMNS)
    if "class_number" in table and not table["class_number"].isna().any():
        fields["alignments2D/class"] = (table["class_number"].to_numpy(np.int64) - 1).astype(np.uint32)
        used.add("class_number")
    _add_other_fields(table, used, fields)
    _complete_slots(table, fields)
    dtype = [(name, values.dtype, values.shape[1:]) for name, values in fields.items()]
    out = np.zeros(n, dtype=dtype)
    for name, values in fields.items():
        out[name] = values
    return out


#: Every field of the result slots cryoSPARC writes for particles (the dtype of a cryoSPARC particle .cs):
#: (field, dtype, shape). A slot present in a written file is completed with these so that cryoSPARC's
#: importers, which expect whole slots, accept it.
SLOT_FIELDS: dict[str, list[tuple[str, str, tuple]]] = {
    "blob": [("path", "S", ()), ("idx", "<u4", ()), ("shape", "<u4", (2,)), ("psize_A", "<f4", ()),
             ("sign", "<f4", ()), ("import_sig", "<u8", ())],
    "ctf": [("type", "S", ()), ("exp_group_id", "<u4", ()), ("accel_kv", "<f4", ()), ("cs_mm", "<f4", ()),
            ("amp_contrast", "<f4", ()), ("df1_A", "<f4", ()), ("df2_A", "<f4", ()), ("df_angle_rad", "<f4", ()),
            ("phase_shift_rad", "<f4", ()), ("scale", "<f4", ()), ("scale_const", "<f4", ()),
            ("shift_A", "<f4", (2,)), ("tilt_A", "<f4", (2,)), ("trefoil_A", "<f4", (2,)),
            ("tetra_A", "<f4", (4,)), ("anisomag", "<f4", (4,)), ("bfactor", "<f4", ())],
    "alignments3D": [("split", "<u4", ()), ("shift", "<f4", (2,)), ("pose", "<f4", (3,)), ("psize_A", "<f4", ()),
                     ("error", "<f4", ()), ("error_min", "<f4", ()), ("resid_pow", "<f4", ()),
                     ("slice_pow", "<f4", ()), ("image_pow", "<f4", ()), ("cross_cor", "<f4", ()),
                     ("alpha", "<f4", ()), ("alpha_min", "<f4", ()), ("weight", "<f4", ()), ("pose_ess", "<f4", ()),
                     ("shift_ess", "<f4", ()), ("class_posterior", "<f4", ()), ("class", "<u4", ()),
                     ("class_ess", "<f4", ())],
}
SLOT_FIELDS["alignments2D"] = list(SLOT_FIELDS["alignments3D"])

#: Values of slot fields that isavar has no data for (anything else is 0).
_SLOT_DEFAULTS = {"blob/sign": 1.0, "ctf/type": b"imported", "ctf/scale": 1.0, "ctf/anisomag": [1.0, 0.0, 0.0, 1.0],
                  "alignments3D/alpha": 1.0, "alignments3D/alpha_min": 1.0, "alignments3D/weight": 1.0,
                  "alignments3D/class_posterior": 1.0, "alignments3D/class_ess": 1.0,
                  "alignments3D/pose_ess": 1.0, "alignments3D/shift_ess": 1.0,
                  "alignments2D/alpha": 1.0, "alignments2D/alpha_min": 1.0, "alignments2D/weight": 1.0,
                  "alignments2D/class_posterior": 1.0, "alignments2D/class_ess": 1.0,
                  "alignments2D/pose_ess": 1.0, "alignments2D/shift_ess": 1.0}


def _complete_slots(table: pd.DataFrame, fields: dict) -> None:
    """Add the missing fields of every slot present (``ctf/scale`` from ``ctf_scale``, ``ctf/bfactor``
    from ``ctf_bfactor_A2``, ``alignments*/split`` from RELION's ``rlnRandomSubset`` or alternating 0/1)."""
    n = len(table)
    derived = {}
    if "ctf_scale" in table and not table["ctf_scale"].isna().any():
        derived["ctf/scale"] = table["ctf_scale"].to_numpy(np.float64)
    if "ctf_bfactor_A2" in table:
        derived["ctf/bfactor"] = table["ctf_bfactor_A2"].fillna(0.0).to_numpy(np.float64)
    if "rlnRandomSubset" in table and not table["rlnRandomSubset"].isna().any():
        split = np.clip(table["rlnRandomSubset"].to_numpy(np.int64) - 1, 0, 1)
    else:
        split = np.arange(n) % 2                                      # gold-standard halves, deterministic
    derived["alignments3D/split"] = derived["alignments2D/split"] = split
    for slot, spec in SLOT_FIELDS.items():
        if not any(name.startswith(slot + "/") for name in fields):
            continue
        for field, dtype, shape in spec:
            name = f"{slot}/{field}"
            if name in fields:
                continue
            if name in derived:
                values = np.asarray(derived[name])
            else:
                values = np.broadcast_to(np.asarray(_SLOT_DEFAULTS.get(name, 0)), (n, *shape))
            fields[name] = np.array(values, dtype=dtype if dtype != "S" else "S16").reshape((n, *shape))


def _add_other_fields(table: pd.DataFrame, used: set, fields: dict) -> None:
    vectors: dict[str, dict[int, str]] = {}
    for column in table.columns:
        if column in used:
            continue
        m = _VECTOR_COLUMN.match(column)
        if m and not column.startswith(CRYOSPARC_CUSTOM_PREFIX):
            vectors.setdefault(m.group(1), {})[int(m.group(2))] = column
            continue
        name = column if not (column in CANONICAL_COLUMNS or column.startswith("true_")) \
            else CRYOSPARC_CUSTOM_PREFIX + column
        values = _field_values(table[column])
        if values is None:
            log.warning("cryoSPARC output: column %s not written (values cannot be stored)", column)
            continue
        if name in fields:
            continue
        fields[name] = values
    for base, parts in vectors.items():
        if sorted(parts) != list(range(len(parts))) or base in fields:
            for column in parts.values():
                values = _field_values(table[column])
                if values is not None and column not in fields:
                    fields[column] = values
            continue
        stacked = np.stack([table[parts[k]].to_numpy() for k in range(len(parts))], axis=1)
        fields[base] = stacked


def _field_values(series: pd.Series):
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object)
    if pd.api.types.is_bool_dtype(series):
        return series.to_numpy(bool)
    if pd.api.types.is_integer_dtype(series) and not series.isna().any():
        return series.to_numpy()
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(np.float64)
    if series.map(lambda v: isinstance(v, (str, bytes))).all():
        return _string_field(series)
    return None


def write_cs(path, chunks, table: pd.DataFrame, *, pixel_size_A: float | None = None,
             overwrite: bool = False) -> None:
    """Write a cryoSPARC ``.cs`` file and its ``<stem>.mrcs`` image stack.

    Fields of a table read from a ``.cs`` (``uid`` and unknown fields) are kept.

    Parameters
    ----------
    path : path
        Output ``.cs``.
    chunks : iterable of numpy.ndarray
        Image blocks in table order.
    table : pandas.DataFrame
        Particle table.
    pixel_size_A : float, optional
        Pixel size where the table has none.
    overwrite : bool
        Replace existing files.
    """
    from isavar.io.star import write_sidecar_stack

    path = Path(path)
    stack, table, box = write_sidecar_stack(path, chunks, table, pixel_size_A, overwrite=overwrite)
    array = build_cs_array(table, stack.name, box)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
