"""The particle table: one pandas DataFrame schema shared by every format and algorithm.

A particle table has one row per image. Canonical columns carry the units in
their names; every other column read from a file is kept unchanged
("passthrough", e.g. ``rlnLogLikeliContribution`` or a cryoSPARC field) and
written back where the target format can hold it.

Canonical columns
-----------------
======================  ======  ======================================================
column                  dtype   meaning
======================  ======  ======================================================
image_path              str     path of the stack file holding the image (absolute; read from a
                                file naming many stacks it is a categorical: one string per file)
image_index             int     0-based position of the image in that stack
pixel_size_A            float   pixel size, Å
image_size_px           int     box size, pixels
optics_group            int     RELION optics group (1-based)
micrograph_name         str     source micrograph
coordinate_x_px         float   particle position in the micrograph, pixels
coordinate_y_px         float
defocus_u_A             float   defocus along U, Å, positive = underfocus
defocus_v_A             float   defocus along V, Å
defocus_angle_deg       float   angle from x to U, degrees (RELION)
voltage_kV              float   acceleration voltage, kV
cs_mm                   float   spherical aberration, mm
amplitude_contrast      float   amplitude contrast as a fraction (0.1 = 10 %)
phase_shift_deg         float   phase shift, degrees (phase plates)
ctf_bfactor_A2          float   CTF envelope B-factor, Å²
ctf_scale               float   CTF scale factor
angle_rot_deg           float   RELION/SPIDER ZYZ Euler angles, degrees
angle_tilt_deg          float
angle_psi_deg           float
origin_x_A              float   RELION origin, Å (shifting the image by +origin centres it)
origin_y_A              float
origin_x_px             float   only where a file gives origins in pixels without a pixel
origin_y_px                     size (SPHIRE HDF without apix_x); --apix converts them
align_alpha_deg         float   2D alignment (SPHIRE convention, see conventions.py), degrees
align_sx_px             float   2D alignment shifts, pixels
align_sy_px             float
align_mirror            int     2D alignment mirror flag, 0/1
class_number            int     class, 1-based (RELION rlnClassNumber)
segment_angle_deg       float   filament segment angle, degrees (SPHIRE segment_angle)
true_*                  any     simulator ground truth (true_angle_rot_deg, true_origin_x_A,
                                true_defocus_u_A, true_conformation, ...)
======================  ======  ======================================================
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Canonical columns, their dtype kind and a one-line description (units included).
CANONICAL_COLUMNS: dict[str, tuple[str, str]] = {
    "image_path": ("str", "path of the stack file holding the image"),
    "image_index": ("int", "0-based index of the image in its stack"),
    "pixel_size_A": ("float", "pixel size in Å"),
    "image_size_px": ("int", "box size in pixels"),
    "optics_group": ("int", "optics group, 1-based"),
    "micrograph_name": ("str", "source micrograph"),
    "coordinate_x_px": ("float", "x position in the micrograph, pixels"),
    "coordinate_y_px": ("float", "y position in the micrograph, pixels"),
    "defocus_u_A": ("float", "defocus U in Å, positive = underfocus"),
    "defocus_v_A": ("float", "defocus V in Å"),
    "defocus_angle_deg": ("float", "astigmatism angle in degrees (RELION)"),
    "voltage_kV": ("float", "acceleration voltage in kV"),
    "cs_mm": ("float", "spherical aberration in mm"),
    "amplitude_contrast": ("float", "amplitude contrast as a fraction"),
    "phase_shift_deg": ("float", "phase shift in degrees"),
    "ctf_bfactor_A2": ("float", "CTF B-factor in Å²"),
    "ctf_scale": ("float", "CTF scale factor"),
    "angle_rot_deg": ("float", "Euler rot (ZYZ) in degrees"),
    "angle_tilt_deg": ("float", "Euler tilt (ZYZ) in degrees"),
    "angle_psi_deg": ("float", "Euler psi (ZYZ) in degrees"),
    "origin_x_A": ("float", "RELION origin x in Å"),
    "origin_y_A": ("float", "RELION origin y in Å"),
    "align_alpha_deg": ("float", "2D alignment angle in degrees (SPHIRE convention)"),
    "align_sx_px": ("float", "2D alignment x shift in pixels"),
    "align_sy_px": ("float", "2D alignment y shift in pixels"),
    "align_mirror": ("int", "2D alignment mirror flag 0/1"),
    "class_number": ("int", "class, 1-based"),
    "segment_angle_deg": ("float", "filament segment angle in degrees"),
}

#: Columns needed to evaluate a CTF.
CTF_COLUMNS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amplitude_contrast")

#: Columns of a 3D orientation.
ORIENTATION_COLUMNS = ("angle_rot_deg", "angle_tilt_deg", "angle_psi_deg")

#: Columns of the 3D origin shift.
ORIGIN_COLUMNS = ("origin_x_A", "origin_y_A")

#: Columns of a 2D alignment.
ALIGN2D_COLUMNS = ("align_alpha_deg", "align_sx_px", "align_sy_px", "align_mirror")

#: Prefix of simulator ground-truth columns.
TRUTH_PREFIX = "true_"


def has_columns(table: pd.DataFrame, columns) -> bool:
    """Return True if every column is present and has no missing value.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table.
    columns : iterable of str
        Column names.

    Returns
    -------
    bool
    """
    return all(c in table.columns and not table[c].isna().any() for c in columns)


def missing_columns(table: pd.DataFrame, columns) -> list[str]:
    """List the columns absent from the table or holding missing values.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table.
    columns : iterable of str
        Column names.

    Returns
    -------
    list of str
    """
    return [c for c in columns if c not in table.columns or table[c].isna().any()]


def has_ctf(table: pd.DataFrame) -> bool:
    """Return True if every particle has the CTF parameters needed to evaluate a CTF."""
    return has_columns(table, CTF_COLUMNS)


def has_orientations(table: pd.DataFrame) -> bool:
    """Return True if every particle has 3D Euler angles."""
    return has_columns(table, ORIENTATION_COLUMNS)


def new_table(n: int, *, image_path: str | None = None, pixel_size_A: float | None = None) -> pd.DataFrame:
    """Create a particle table of ``n`` rows indexing images 0..n-1 of one stack.

    Parameters
    ----------
    n : int
        Number of particles.
    image_path : str, optional
        Stack holding the images.
    pixel_size_A : float, optional
        Pixel size in Å.

    Returns
    -------
    pandas.DataFrame
        Table with ``image_index`` (and ``image_path``/``pixel_size_A`` when given).
    """
    table = pd.DataFrame({"image_index": np.arange(n, dtype=np.int64)})
    if image_path is not None:
        table.insert(0, "image_path", str(image_path))
    if pixel_size_A is not None:
        table["pixel_size_A"] = float(pixel_size_A)
    return table


# --------------------------------------------------------------------------------------
# Format label maps and validation
# --------------------------------------------------------------------------------------

#: RELION particle-block labels of canonical columns (the image name is handled separately).
RELION_PARTICLE_LABELS: dict[str, str] = {
    "optics_group": "rlnOpticsGroup",
    "micrograph_name": "rlnMicrographName",
    "coordinate_x_px": "rlnCoordinateX",
    "coordinate_y_px": "rlnCoordinateY",
    "defocus_u_A": "rlnDefocusU",
    "defocus_v_A": "rlnDefocusV",
    "defocus_angle_deg": "rlnDefocusAngle",
    "phase_shift_deg": "rlnPhaseShift",
    "ctf_bfactor_A2": "rlnCtfBfactor",
    "ctf_scale": "rlnCtfScalefactor",
    "angle_rot_deg": "rlnAngleRot",
    "angle_tilt_deg": "rlnAngleTilt",
    "angle_psi_deg": "rlnAnglePsi",
    "origin_x_A": "rlnOriginXAngst",
    "origin_y_A": "rlnOriginYAngst",
    "class_number": "rlnClassNumber",
}

#: RELION optics-block labels of canonical columns (RELION >= 3.1).
RELION_OPTICS_LABELS: dict[str, str] = {
    "voltage_kV": "rlnVoltage",
    "cs_mm": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
    "pixel_size_A": "rlnImagePixelSize",
    "image_size_px": "rlnImageSize",
}

#: Every RELION label that maps to a canonical column.
RELION_LABELS: dict[str, str] = {**RELION_PARTICLE_LABELS, **RELION_OPTICS_LABELS}

#: Prefix of the STAR labels isavar writes for columns RELION has no label for
#: (``true_angle_rot_deg`` -> ``rlnIsavar_true_angle_rot_deg``). RELION 3.1 keeps
#: unknown labels it reads and writes them back unchanged.
STAR_CUSTOM_PREFIX = "rlnIsavar_"

#: cryoSPARC fields of canonical columns that convert with a unit change only.
CRYOSPARC_FIELDS: dict[str, str] = {
    "defocus_u_A": "ctf/df1_A",
    "defocus_v_A": "ctf/df2_A",
    "voltage_kV": "ctf/accel_kv",
    "cs_mm": "ctf/cs_mm",
    "amplitude_contrast": "ctf/amp_contrast",
    "ctf_bfactor_A2": "ctf/bfactor",
    "pixel_size_A": "blob/psize_A",
    "micrograph_name": "location/micrograph_path",
}

#: Prefix of the cryoSPARC fields isavar writes for columns cryoSPARC has no field for.
CRYOSPARC_CUSTOM_PREFIX = "isavar/"

#: EMAN2/SPHIRE header keys (without ``EMAN.``) of canonical columns stored as plain scalars.
EMAN_KEYS: dict[str, str] = {
    "pixel_size_A": "apix_x",
    "micrograph_name": "ptcl_source_image",
    "segment_angle_deg": "segment_angle",
}

_INT_COLUMNS = tuple(c for c, (kind, _) in CANONICAL_COLUMNS.items() if kind == "int")
_FLOAT_COLUMNS = tuple(c for c, (kind, _) in CANONICAL_COLUMNS.items() if kind == "float")


def is_canonical(column: str) -> bool:
    """Return True for a canonical column or a ground-truth (``true_*``) column."""
    return column in CANONICAL_COLUMNS or column.startswith(TRUTH_PREFIX)


def coerce_dtypes(table: pd.DataFrame) -> pd.DataFrame:
    """Cast the canonical columns present to their documented dtypes (returns a new table).

    Integer columns with missing values become pandas nullable ``Int64``.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table.

    Returns
    -------
    pandas.DataFrame
    """
    out = table.copy(deep=False)          # columns are replaced, never changed in place
    for c in _FLOAT_COLUMNS:
        if c in out.columns:
            out[c] = pd.to_numeric(out[c], errors="coerce").astype(np.float64)
    for c in _INT_COLUMNS:
        if c in out.columns:
            values = pd.to_numeric(out[c], errors="coerce")
            if values.isna().any():
                out[c] = values.round().astype("Int64")
            else:
                out[c] = np.round(values.to_numpy(dtype=np.float64)).astype(np.int64)
    for c in ("image_path", "micrograph_name"):
        if c in out.columns:
            if isinstance(out[c].dtype, pd.CategoricalDtype):     # a few files named by many rows
                out[c] = out[c].cat.rename_categories([str(v) for v in out[c].cat.categories])
            else:
                out[c] = out[c].astype(str)
    return out


def compact_column(values):
    """A column's values for a particle table: text that repeats (a micrograph name per particle) as a
    categorical, other values unchanged.

    Parameters
    ----------
    values : pandas.Series or array_like
        ``(n,)`` values of one column.

    Returns
    -------
    pandas.Categorical or pandas.api.extensions.ExtensionArray or numpy.ndarray
        A categorical when the values are text with at most one distinct value per four rows (one string
        per micrograph instead of one per particle: 40 MB less per million rows and name); otherwise the
        values as they are (no copy).
    """
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    if not (pd.api.types.is_object_dtype(series.dtype) or pd.api.types.is_string_dtype(series.dtype)) \
            or isinstance(series.dtype, pd.CategoricalDtype) or len(series) < 8:
        return series.array if isinstance(series.dtype, pd.api.extensions.ExtensionDtype) else series.to_numpy()
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    if len(uniques) * 4 > len(series) or not all(isinstance(u, str) for u in uniques):
        return series.array if isinstance(series.dtype, pd.api.extensions.ExtensionDtype) else series.to_numpy()
    return pd.Categorical.from_codes(codes, categories=pd.Index(list(uniques), dtype=object))


def validate(table: pd.DataFrame, *, permissive: bool = False) -> list[str]:
    """Check a particle table against the schema.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table.
    permissive : bool
        If True, return the problems instead of raising.

    Returns
    -------
    list of str
        Problems found (empty when the table is valid).

    Raises
    ------
    ValueError
        If a problem is found and ``permissive`` is False.
    """
    problems = []
    for c in _INT_COLUMNS + _FLOAT_COLUMNS:
        if c in table.columns and not pd.api.types.is_numeric_dtype(table[c]):
            problems.append(f"column {c} is not numeric")
    if "image_index" in table.columns and pd.api.types.is_numeric_dtype(table["image_index"]):
        if (table["image_index"] < 0).any():
            problems.append("image_index has negative values (it is 0-based)")
    for c in ("class_number", "optics_group"):
        if c in table.columns and pd.api.types.is_numeric_dtype(table[c]) and (table[c].dropna() < 1).any():
            problems.append(f"{c} has values below 1 (it is 1-based)")
    if "align_mirror" in table.columns and pd.api.types.is_numeric_dtype(table["align_mirror"]):
        if not table["align_mirror"].dropna().isin([0, 1]).all():
            problems.append("align_mirror has values other than 0 and 1")
    for c in ("pixel_size_A", "image_size_px"):
        if c in table.columns and pd.api.types.is_numeric_dtype(table[c]) and (table[c].dropna() <= 0).any():
            problems.append(f"{c} has values <= 0")
    if problems and not permissive:
        raise ValueError("; ".join(problems))
    return problems


def set_pixel_size(stack, pixel_size_A: float):
    """Set the pixel size of a particle stack read from a file (the ``--apix`` option).

    Parameters
    ----------
    stack : ParticleStack
        As read by :func:`isavar.io.read_particles`; not modified.
    pixel_size_A : float
        Pixel size in Å (> 0).

    Returns
    -------
    ParticleStack
        A copy with ``pixel_size_A`` set for every row; origins the file gives
        only in pixels (``origin_x_px``/``origin_y_px``) converted to
        ``origin_x_A``/``origin_y_A`` and dropped. Origins already in Å are kept.
    """
    import dataclasses

    from isavar.errors import InputError

    apix = float(pixel_size_A)
    if not np.isfinite(apix) or apix <= 0:
        raise InputError(f"--apix must be a positive pixel size in Å (got {pixel_size_A})")
    table = stack.table.copy()
    given = table["pixel_size_A"].dropna().unique() if "pixel_size_A" in table.columns else []
    if len(given) and not np.allclose(given, apix, rtol=1e-4):
        import logging

        logging.getLogger(__name__).warning("%s: pixel size %s Å in the file replaced by --apix %g Å",
                                            stack.path, ", ".join(f"{g:g}" for g in given), apix)
    table["pixel_size_A"] = apix
    for axis in ("x", "y"):
        px, a = f"origin_{axis}_px", f"origin_{axis}_A"
        if px in table.columns:
            values = table[a] if a in table.columns else pd.Series(np.nan, index=table.index)
            table[a] = values.where(values.notna(), table[px] * apix)
            table = table.drop(columns=px)
    return dataclasses.replace(stack, table=table, pixel_size_A=apix)
#: Columns that name an image.
IMAGE_COLUMNS = ("image_path", "image_index")


def duplicated_rows(table: pd.DataFrame, columns=None) -> np.ndarray:
    """Rows that repeat an earlier row: the same image and the same values in ``columns``.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table.
    columns : iterable of str, optional
        Columns that must also agree (those absent from the table are ignored); default every column
        holding scalar values (an exact copy of the row). ``()`` compares the image only.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` bool, True for every repetition (the first occurrence is False); all False when the
        table does not name its images (``image_path``, ``image_index``).
    """
    if any(c not in table.columns for c in IMAGE_COLUMNS) or len(table) < 2:
        return np.zeros(len(table), bool)
    # Only rows naming an image named by another row can repeat one: compare the rest on those alone.
    same_image = table.duplicated(subset=list(IMAGE_COLUMNS), keep=False).to_numpy()
    out = np.zeros(len(table), bool)
    if not same_image.any():
        return out
    table = table[same_image]
    if columns is None:
        columns = [c for c in table.columns if table[c].dtype != object
                   or table[c].map(lambda v: isinstance(v, (str, bytes, int, float))).all()]
    keys = list(IMAGE_COLUMNS) + [c for c in columns if c in table.columns and c not in IMAGE_COLUMNS]
    out[same_image] = table.duplicated(subset=keys, keep="first").to_numpy()
    return out


def describe_duplicates(table: pd.DataFrame, duplicated: np.ndarray) -> str:
    """``"12 rows repeat an earlier one (first: row 40 repeats row 3, image 3 of particles.mrcs)"``.

    Rows are 1-based, as in the data block of a STAR file.
    """
    rows = np.flatnonzero(duplicated)
    if rows.size == 0:
        return "no row repeats an earlier one"
    r = int(rows[0])
    path, index = table["image_path"].iloc[r], int(table["image_index"].iloc[r])
    same = (table["image_path"] == path) & (table["image_index"] == index)
    first = int(np.flatnonzero(same.to_numpy())[0])
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    return (f"{rows.size} row{'s' if rows.size > 1 else ''} repeat an earlier one (first: row {r + 1} repeats "
            f"row {first + 1}, image {index + 1} of {name})")
