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
image_path              str     path of the stack file holding the image (absolute)
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
